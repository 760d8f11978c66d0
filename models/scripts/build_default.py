#!/usr/bin/env python3
"""Compose models/customer-service/model.onnx from the pinned encoder and the committed head.

    python models/scripts/build_default.py --encoder runtime/encoders/all-MiniLM-L6-v2-int8/model.onnx

Run by scripts/setup; never retrains (train_default.py does that, on a developer's machine).
Outputs of the composed graph: `intent_probs` [batch, 77] (softmax) and `sentence_embedding`
[batch, 384] (masked mean + L2 norm).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compose  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "..", "customer-service")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--out", default=os.path.join(MODEL_DIR, "model.onnx"))
    args = ap.parse_args()
    head = np.load(os.path.join(MODEL_DIR, "head.npz"))
    model = compose.pooled_encoder(args.encoder)
    compose.add_linear_head(model, "intent_probs", head["intent_weight"], head["intent_bias"], "softmax")
    # The embedding stays an output too: OOD scoring and retraining read it.
    emb = [o for o in model.graph.output if o.name == compose.EMBEDDING_OUTPUT]
    others = [o for o in model.graph.output if o.name != compose.EMBEDDING_OUTPUT]
    del model.graph.output[:]
    model.graph.output.extend(others + emb)
    tmp = args.out + ".tmp"
    compose.save(model, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {os.path.relpath(args.out)} ({os.path.getsize(args.out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
