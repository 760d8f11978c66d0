#!/usr/bin/env python3
"""Reference outputs of the default model from Python onnxruntime, for tests/golden.rs.

    .venv/bin/pip install -r models/requirements-dev.txt
    .venv/bin/python models/scripts/make_golden.py

Each message is rendered the way triage renders it ("{subject}\\n{body}", trimmed), tokenized
by Python `tokenizers` with truncation at 128, and run ALONE (no padding), so the Rust side,
which runs them in padded, length-bucketed batches, is checked against the unbatched truth.
Writes tests/fixtures/golden-customer-service.json.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_tokenizer, session  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "customer-service")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden-customer-service.json")

LONG_BODY = ("My card was declined again at the supermarket today even though my balance is fine. " * 40).strip()
MESSAGES = [
    {"body": "I am still waiting on my card?"},
    {"subject": "Stolen", "body": "Someone stole my card, please block it"},
    {"body": "Why did my transfer fail?"},
    {"subject": "Fees", "body": "What are the fees for topping up with a card from another country? I travel a lot and need to know before I go."},
    {"body": "How do I activate my new card"},
    {"body": "¿Puedo usar mi tarjeta en España? Ünïcödé façade — 日本語のテキスト"},
    {"subject": "Wrong amount", "body": "The ATM gave me less money than I asked for"},
    {"body": "I don't recognise a direct debit on my account from last Tuesday."},
    {"subject": "Account closure", "body": "Please close my account. I am moving to another bank and want all my money transferred."},
    {"body": "pin blocked"},
    {"subject": "Exchange", "body": "Which currencies can I hold and exchange in the app?"},
    {"subject": "Long complaint", "body": LONG_BODY},
    {"body": "Can I get a refund for an item I bought with my card last month? The merchant is not responding to my emails and I have tried calling them several times."},
    {"body": "card payment pending for 3 days"},
    {"subject": "Verification", "body": "Why do you need to verify my identity? I already sent you my passport."},
    {"body": "top up reverted"},
]


def render(m: dict) -> str:
    return f"{m.get('subject', '')}\n{m.get('body', '')}".strip()


def main() -> None:
    with open(os.path.join(MODEL, "model.toml"), "rb") as f:
        import tomllib
        desc = tomllib.load(f)
    labels = desc["heads"][0]["labels"]
    tok = load_tokenizer(os.path.join(MODEL, "tokenizer.json"), desc["max_length"])
    sess = session(os.path.join(MODEL, "model.onnx"))
    cases = []
    for m in MESSAGES:
        enc = tok.encode(render(m))
        ids = np.array([enc.ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.array([enc.type_ids], dtype=np.int64)}
        probs, emb = sess.run(["intent_probs", "sentence_embedding"], feed)
        top = int(np.argmax(probs[0]))
        cases.append({
            "message": m,
            "tokens": len(enc.ids),
            "category": labels[top],
            "confidence": float(probs[0][top]),
            "embedding": [float(x) for x in emb[0]],
        })
    with open(OUT, "w") as f:
        json.dump({"model": "customer-service", "max_length": desc["max_length"], "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT)}: {len(cases)} cases")


if __name__ == "__main__":
    main()
