#!/usr/bin/env python3
"""Int8 dynamic quantization of an encoder directory (made by build_encoder.py).

    python models/scripts/quantize_encoder.py --src runtime/encoders/minilm-l6 --out runtime/encoders/minilm-l6-int8

The pinned encoder stores int8 weights that the graph dequantizes (Cast + Mul) into fp32 at
load: ONNX Runtime then runs fp32 GEMMs. Dynamic quantization needs plain fp32 weights, so the
graph is first constant-folded at ONNX Runtime's basic optimisation level (the dequantization
becomes fp32 initializers), then every MatMul is quantized (int8 weights, activations quantized
per batch at run time: MatMulInteger, which uses VNNI / AMX where the CPU has them).
Needs the onnxruntime Python package (scripts/build-variants installs it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic


def fold(src: str, out: str) -> None:
    """Save `src` at ONNX Runtime's basic level: the in-graph dequantization (Cast + Mul) of
    int8-stored weights becomes plain fp32 initializers."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = out
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="encoder directory (model.onnx, tokenizer.json, model.toml)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folded = os.path.join(tmp, "folded.onnx")
        fold(os.path.join(args.src, "model.onnx"), folded)
        target = os.path.join(args.out, "model.onnx")
        quantize_dynamic(folded, target + ".tmp", weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        os.replace(target + ".tmp", target)
    write_beside_graph(args.src, args.out, args.name, "int8 dynamic quantization (models/scripts/quantize_encoder.py)")
    print(f"wrote {args.out} ({os.path.getsize(target) / 1e6:.1f} MB graph)")


def write_beside_graph(src: str, out: str, name: str | None, how: str) -> None:
    """OUT's tokenizer.json (SRC's) and model.toml: SRC's, renamed (default: OUT's last part),
    with a line saying what was made of it."""
    shutil.copyfile(os.path.join(src, "tokenizer.json"), os.path.join(out, "tokenizer.json.tmp"))
    os.replace(os.path.join(out, "tokenizer.json.tmp"), os.path.join(out, "tokenizer.json"))
    name = name or os.path.basename(os.path.normpath(out))
    with open(os.path.join(src, "model.toml")) as f:
        descriptor = f.read()
    # The top-level name (the first `name =` line, before any [[heads]] table) becomes this one's.
    descriptor = descriptor.replace(descriptor[descriptor.index("name = "):].split("\n", 1)[0], f'name = "{name}"', 1)
    with open(os.path.join(out, "model.toml.tmp"), "w") as f:
        f.write(f"# {how[0].upper()}{how[1:]} of {os.path.relpath(src)}.\n" + descriptor)
    os.replace(os.path.join(out, "model.toml.tmp"), os.path.join(out, "model.toml"))


if __name__ == "__main__":
    main()
