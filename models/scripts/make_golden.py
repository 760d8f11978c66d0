#!/usr/bin/env python3
"""Reference outputs of the default model from Python onnxruntime + numpy heads, for tests/golden.rs.

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


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The safetensors format by hand (8-byte header length, JSON header, raw little-endian data),
    so this check shares no code with the Rust reader."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    kinds = {"F32": np.float32, "U64": np.uint64}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + start:8 + n + end], dtype=kinds[t["dtype"]]).reshape(t["shape"])
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


CHAR_FLAG = 1 << 63


def char_gram(gram: str) -> int:
    """FNV-1a 64 of the UTF-8 bytes, top bit set (so it never meets a word-piece key)."""
    h = 0xCBF29CE484222325
    for b in gram.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return CHAR_FLAG | (h & (CHAR_FLAG - 1))


def lexical_features(ids: list[int], text: str, keys: np.ndarray, idf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Word-piece unigrams (the id) and bigrams ((first + 1) << 32 | second), and, when the
    vocabulary has them (keys with the top bit), character 3-5 grams of each lower-cased word
    padded with one space; sublinear TF x IDF, L2."""
    counts: dict[int, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    for a, b in zip(ids, ids[1:]):
        k = ((a + 1) << 32) | b
        counts[k] = counts.get(k, 0) + 1
    if len(keys) and int(keys[-1]) & CHAR_FLAG:
        for word in text.lower().split():
            padded = f" {word} "
            for n in range(3, 6):
                for i in range(len(padded) - n + 1):
                    k = char_gram(padded[i:i + n])
                    counts[k] = counts.get(k, 0) + 1
    cols, vals = [], []
    for k, tf in counts.items():
        j = int(np.searchsorted(keys, np.uint64(k)))
        if j < len(keys) and int(keys[j]) == k:
            cols.append(j)
            vals.append((1.0 + np.log(tf)) * idf[j])
    vals = np.array(vals, dtype=np.float64)
    if len(vals):
        vals /= np.linalg.norm(vals)
    return np.array(cols, dtype=np.int64), vals


def main() -> None:
    with open(os.path.join(MODEL, "model.toml"), "rb") as f:
        import tomllib
        desc = tomllib.load(f)
    head = desc["heads"][0]
    labels, share = head["labels"], head.get("lexical_share", 0.0)
    w = read_safetensors(os.path.join(MODEL, "heads.safetensors"))
    tok = load_tokenizer(os.path.join(MODEL, "tokenizer.json"), desc["max_length"])
    sess = session(os.path.join(MODEL, "model.onnx"))
    cases = []
    for m in MESSAGES:
        enc = tok.encode(render(m))
        ids = np.array([enc.ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.array([enc.type_ids], dtype=np.int64)}
        (emb,) = sess.run(["sentence_embedding"], feed)
        e = emb[0].astype(np.float64)
        probs = softmax(w[f"{head['name']}.weight"].astype(np.float64) @ e + w[f"{head['name']}.bias"])
        if share > 0:
            cols, vals = lexical_features(enc.ids, render(m), w["lexical.features"], w["lexical.idf"].astype(np.float64))
            lex = w[f"{head['name']}.lexical.weight"].astype(np.float64)
            z = w[f"{head['name']}.lexical.bias"].astype(np.float64) + (vals[:, None] * lex[cols]).sum(axis=0)
            probs = (1 - share) * probs + share * softmax(z)
        centroids = w["ood.centroids"].astype(np.float64)
        top = int(np.argmax(probs))
        cases.append({
            "message": m,
            "tokens": len(enc.ids),
            "category": labels[top],
            "confidence": float(probs[top]),
            "ood_score": float(1.0 - (centroids @ (e / np.linalg.norm(e))).max()),
            "embedding": [float(x) for x in emb[0]],
        })
    with open(OUT, "w") as f:
        json.dump({"model": "customer-service", "version": desc["version"], "max_length": desc["max_length"], "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT)}: {len(cases)} cases")


if __name__ == "__main__":
    main()
