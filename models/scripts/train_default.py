#!/usr/bin/env python3
"""Train the default customer-service head on Banking77 (developer tool; the setup never runs it).

    python models/scripts/train_default.py --encoder PATH/model.onnx --data ../shared/data/banking77

Frozen all-MiniLM-L6-v2 + masked-mean pooling + L2 norm, then multinomial logistic regression
(L2, C chosen by 3-fold CV) on a fixed-seed stratified 80/20 split. A TF-IDF + logistic
regression baseline is trained on the same split. Writes the committed small parts of
models/customer-service/: head.npz, model.toml (labels + priority map), metrics.json, MODEL_CARD.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split

sys.path.insert(0, os.path.dirname(__file__))
import compose  # noqa: E402
from common import load_tokenizer, run_batched, session  # noqa: E402
from priority_map import priority_of  # noqa: E402

SEED = 42
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "customer-service")


def read_banking(path: str) -> tuple[list[str], list[str]]:
    with open(os.path.join(path, "train.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def read_ticket_bodies(path: str, limit: int) -> list[str]:
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r.get("body") and r.get("subject") is not None and r.get("language") == "en":
                    out.append(f"{r['subject']}\n{r['body']}")
                if len(out) >= limit:
                    break
    except FileNotFoundError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--data", default=os.path.join(HERE, "../../../shared/data/banking77"))
    ap.add_argument("--tickets", default=os.path.join(HERE, "../../../shared/data/support-tickets/tickets-v5.csv"))
    args = ap.parse_args()

    texts, labels = read_banking(args.data)
    with open(os.path.join(args.data, "categories.json")) as f:
        label_names = json.load(f)
    tr_x, va_x, tr_y, va_y = train_test_split(texts, labels, test_size=0.2, random_state=SEED, stratify=labels)
    print(f"train {len(tr_x)}  validation {len(va_x)}  labels {len(label_names)}")

    tokenizer_path = os.path.join(OUT, "tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        pooled_path = os.path.join(tmp, "pooled.onnx")
        compose.save(compose.pooled_encoder(args.encoder), pooled_path)
        sess = session(pooled_path)
        emb = {}
        for max_len in (128, 256):
            tok = load_tokenizer(tokenizer_path, max_len)
            t0 = time.time()
            (tr_e,) = run_batched(sess, tok, tr_x, [compose.EMBEDDING_OUTPUT])
            (va_e,) = run_batched(sess, tok, va_x, [compose.EMBEDDING_OUTPUT])
            emb[max_len] = (tr_e, va_e)
            print(f"embedded at {max_len} in {time.time() - t0:.0f}s")

        # Throughput on e-mail-length tickets at each truncation (python onnxruntime, batch 32).
        speed = {}
        tickets = read_ticket_bodies(args.tickets, 256)
        if tickets:
            for max_len in (128, 256):
                tok = load_tokenizer(tokenizer_path, max_len)
                t0 = time.time()
                run_batched(sess, tok, tickets, [compose.EMBEDDING_OUTPUT], batch_size=32, progress=False)
                speed[max_len] = len(tickets) / (time.time() - t0)

    index = {name: i for i, name in enumerate(label_names)}
    ytr = np.array([index[y] for y in tr_y])
    yva = np.array([index[y] for y in va_y])

    grid = GridSearchCV(LogisticRegression(max_iter=3000), {"C": [2.0, 8.0, 32.0, 128.0]},
                        cv=StratifiedKFold(3, shuffle=True, random_state=SEED), n_jobs=1)
    grid.fit(emb[128][0], ytr)
    best_c = grid.best_params_["C"]
    clf = grid.best_estimator_
    print(f"C={best_c} cv={grid.best_score_:.4f}")
    metrics = {"split": {"train": len(tr_x), "validation": len(va_x), "seed": SEED, "stratified": True},
               "C": best_c}
    for max_len in (128, 256):
        pred = clf.predict(emb[max_len][1])
        metrics[f"embedding_lr_{max_len}"] = {
            "accuracy": float(accuracy_score(yva, pred)),
            "macro_f1": float(f1_score(yva, pred, average="macro")),
        }

    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    base = LogisticRegression(C=20.0, max_iter=3000)
    base.fit(tfidf.fit_transform(tr_x), ytr)
    bpred = base.predict(tfidf.transform(va_x))
    metrics["tfidf_lr"] = {"accuracy": float(accuracy_score(yva, bpred)),
                           "macro_f1": float(f1_score(yva, bpred, average="macro"))}
    metrics["python_seq_per_s_tickets"] = {str(k): round(v, 1) for k, v in speed.items()}
    print(json.dumps(metrics, indent=2))

    # The classes sklearn saw are 0..76 in index order (all present in the stratified split).
    assert list(clf.classes_) == list(range(len(label_names)))
    np.savez(os.path.join(OUT, "head.npz"), intent_weight=clf.coef_.astype(np.float32),
             intent_bias=clf.intercept_.astype(np.float32))
    with open(os.path.join(OUT, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    write_descriptor(label_names)


def write_descriptor(label_names: list[str]) -> None:
    lines = [
        "# The default customer-service model. Built by models/scripts/build_default.py from the",
        "# pinned encoder package + the committed head.npz; trained by train_default.py.",
        'name = "customer-service"',
        'version = "1.0.0"',
        "max_length = 128",
        'template = "{subject}\\n{body}"',
        'category_head = "intent"',
        "",
        "[[heads]]",
        'name = "intent"',
        'output = "intent_probs"',
        'kind = "single_label"',
        "labels = [",
    ]
    lines += [f'  "{name}",' for name in label_names]
    lines += ["]", "", "[[heads]]", 'name = "embedding"', 'output = "sentence_embedding"',
              'kind = "embedding"', "", "[priority]", 'from_head = "intent"', 'default = "normal"', "",
              "[priority.map]"]
    lines += [f'"{name}" = "{priority_of(name)}"' for name in label_names if priority_of(name) != "normal"]
    with open(os.path.join(OUT, "model.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
