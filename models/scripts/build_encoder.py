#!/usr/bin/env python3
"""Make an encoder model directory: a raw transformer export + masked-mean pooling + L2
normalisation in one graph, with its tokenizer and a model.toml declaring the embedding head.

    python models/scripts/build_encoder.py --encoder runtime/encoders/all-MiniLM-L6-v2-int8/model.onnx \\
        --tokenizer models/customer-service/tokenizer.json --name minilm-l6 --out runtime/encoders/minilm-l6

Run by scripts/setup. `triage train --encoder DIR` trains heads over such a directory, and the
worker classifies with the trained directory (this graph + heads.safetensors).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compose  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", required=True, help="raw ONNX export with last_hidden_state")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--hidden-output", default="last_hidden_state", help="the encoder output holding token states")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "model.onnx")
    compose.save(compose.pooled_encoder(args.encoder, args.hidden_output), onnx_path + ".tmp")
    os.replace(onnx_path + ".tmp", onnx_path)
    tokenizer = os.path.join(args.out, "tokenizer.json")
    if not (os.path.exists(tokenizer) and os.path.samefile(args.tokenizer, tokenizer)):
        # Copy then rename: never write through a name that may be a hard link to another file.
        shutil.copyfile(args.tokenizer, tokenizer + ".tmp")
        os.replace(tokenizer + ".tmp", tokenizer)
    with open(os.path.join(args.out, "model.toml.tmp"), "w") as f:
        f.write(
            "# An encoder directory (built by models/scripts/build_encoder.py): pooled sentence\n"
            "# embeddings only. Train heads over it with `triage train --encoder <this dir>`.\n"
            f'name = "{args.name}"\nmax_length = {args.max_length}\ntemplate = "{{subject}}\\n{{body}}"\n\n'
            '[[heads]]\nname = "embedding"\noutput = "sentence_embedding"\nkind = "embedding"\n\n'
            f"[architecture]\nlayers = {args.layers}\nhidden = {args.hidden}\nintermediate = {args.intermediate}\n"
        )
    os.replace(os.path.join(args.out, "model.toml.tmp"), os.path.join(args.out, "model.toml"))
    print(f"wrote {args.out} ({os.path.getsize(onnx_path) / 1e6:.1f} MB graph)")


if __name__ == "__main__":
    main()
