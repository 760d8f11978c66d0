#!/usr/bin/env python3
"""Replace each layer's attention subgraph of an encoder directory's graph by ONE fused
com.microsoft Attention node, then (with --int8) quantize it as quantize_encoder.py does, the
Attention nodes included (they become QAttention).

    python models/scripts/fuse_attention.py --src runtime/encoders/minilm-l6 --out runtime/encoders/minilm-l6-fused [--int8]

Why by hand: ONNX Runtime's transformer optimizer fuses LayerNorm and GELU in this export but no
attention, because torch.export writes scaled-dot-product attention as a boolean mask built with
GatherND, a Where into -FLT_MAX, and an IsNaN/Where after the softmax, which its fusion patterns
do not match. The rewrite finds each layer by its parameter names (the query / key / value and
attention-output biases of a BERT-family export), takes the three projections' weights and
biases as one [hidden, 3 x hidden] weight, and wires the Attention node to the raw attention mask
(int32 [batch, sequence]: 1 attends, 0 does not). Its default scale, 1 / sqrt(head size), is the
export's (which multiplies both queries and keys by head_size ** -0.25). Everything the old
subgraph computed and nothing else uses is then removed.

Checks before writing: the fused graph's sentence embeddings match the source's on random
batches with padding (max abs difference printed; over --tolerance fails).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quantize_encoder  # noqa: E402  (its fold: the graph at ONNX Runtime's basic level)


def fail(message: str) -> None:
    print(f"fuse_attention: {message}", file=sys.stderr)
    sys.exit(2)


def folded(path: str, work: str) -> onnx.ModelProto:
    out = os.path.join(work, "folded.onnx")
    quantize_encoder.fold(path, out)
    return onnx.load(out)


def fuse(model: onnx.ModelProto, num_heads: int) -> int:
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    layers = sorted({int(m.group(1)) for i in inits for m in [re.search(r"layer\.(\d+)\.attention\.self\.query\.bias$", i)] if m})
    if not layers:
        fail("no `layer.N.attention.self.query.bias` parameters: not a BERT-family export this script knows")
    mask_name = "fused_attention_mask_int32"
    g.node.insert(0, helper.make_node("Cast", ["attention_mask"], [mask_name], to=TensorProto.INT32, name="fused_attention_mask_cast"))
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def bias_add(suffix: str, layer: int):
        name = next((i for i in inits if i.endswith(f"layer.{layer}.{suffix}")), None)
        if name is None:
            fail(f"layer {layer}: no parameter ending in {suffix}")
        adds = [n for n in consumers.get(name, []) if n.op_type == "Add"]
        if len(adds) != 1:
            fail(f"layer {layer}: {suffix} feeds {len(adds)} Add nodes, expected 1")
        add = adds[0]
        matmul = producer.get(next(i for i in add.input if i != name))
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in inits:
            fail(f"layer {layer}: {suffix} does not follow a MatMul with a constant weight (fold the graph first)")
        return matmul, numpy_helper.to_array(inits[matmul.input[1]]), numpy_helper.to_array(inits[name])

    for layer in layers:
        projections = [bias_add(f"attention.self.{p}.bias", layer) for p in ("query", "key", "value")]
        hidden_inputs = {m.input[0] for m, _, _ in projections}
        if len(hidden_inputs) != 1:
            fail(f"layer {layer}: query, key and value read different inputs {hidden_inputs}")
        output_matmul, _, _ = bias_add("attention.output.dense.bias", layer)
        context = output_matmul.input[0]  # [batch, sequence, hidden]: heads merged again
        weight = np.concatenate([w for _, w, _ in projections], axis=1).astype(np.float32)
        bias = np.concatenate([b for _, _, b in projections]).astype(np.float32)
        w_name, b_name = f"fused_attention_{layer}_qkv_weight", f"fused_attention_{layer}_qkv_bias"
        g.initializer.extend([numpy_helper.from_array(weight, w_name), numpy_helper.from_array(bias, b_name)])
        # The node that made the context now goes: the Attention node makes it instead.
        old = producer[context]
        old.output[0] = f"{context}_unfused"
        g.node.append(helper.make_node(
            "Attention", [hidden_inputs.pop(), w_name, b_name, mask_name], [context],
            domain="com.microsoft", num_heads=num_heads, name=f"fused_attention_{layer}"))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    toposort(model)  # first: pruning walks the nodes in order
    prune(model)
    return len(layers)


def prune(model: onnx.ModelProto) -> None:
    """Remove nodes nothing reaches the outputs through, and initializers no node reads."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)


def toposort(model: onnx.ModelProto) -> None:
    g = model.graph
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        progressed = False
        for n in list(pending):
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
                pending.remove(n)
                progressed = True
        if not progressed:
            missing = sorted({i for n in pending for i in n.input if i not in ready and not any(i in m.output for m in pending)})
            fail(f"the rewritten graph has a cycle or missing inputs {missing[:5]} near {pending[0].name}")
    del g.node[:]
    g.node.extend(ordered)


def max_difference(a_path: str, b_path: str, seed: int = 7) -> float:
    rng = np.random.default_rng(seed)
    a = ort.InferenceSession(a_path, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(b_path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, length in ((1, 5), (4, 17), (8, 64), (3, 128)):
        ids = rng.integers(1000, 29000, size=(batch, length), dtype=np.int64)
        ids[:, 0] = 101
        mask = np.ones_like(ids)
        for r in range(batch):  # ragged rows: padding at the end
            keep = int(rng.integers(2, length + 1))
            mask[r, keep:] = 0
            ids[r, keep:] = 0
            ids[r, keep - 1] = 102
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        worst = max(worst, float(np.abs(a.run(None, feed)[0] - b.run(None, feed)[0]).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="encoder directory (model.onnx with sentence_embedding, tokenizer.json, model.toml)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--int8", action="store_true", help="then quantize (MatMul and Attention: QAttention)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="most an fp32 embedding value may move")
    ap.add_argument("--name", default=None, help="the encoder's name in model.toml (default: --out's last part)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    source = os.path.join(args.src, "model.onnx")
    with tempfile.TemporaryDirectory() as work:
        model = folded(source, work)
        layers = fuse(model, args.heads)
        onnx.checker.check_model(model)
        fused = os.path.join(work, "fused.onnx")
        onnx.save(model, fused)
        diff = max_difference(source, fused)
        print(f"fused {layers} attention layers; fp32 embeddings differ by at most {diff:.2e}")
        if diff > args.tolerance:
            fail(f"the fused graph's embeddings differ from the source's by {diff:.2e} (over {args.tolerance})")
        target = os.path.join(args.out, "model.onnx")
        if args.int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(fused, target + ".tmp", weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Attention"])
            kinds = {n.op_type for n in onnx.load(target + ".tmp").graph.node}
            if "QAttention" not in kinds:
                fail("quantization left the Attention nodes in fp32 (no QAttention)")
        else:
            shutil.copyfile(fused, target + ".tmp")
        os.replace(target + ".tmp", target)
    how = "attention fused" + (", then int8 dynamic quantization" if args.int8 else "")
    quantize_encoder.write_beside_graph(args.src, args.out, args.name, f"{how} (models/scripts/fuse_attention.py)")
    print(f"wrote {args.out} ({os.path.getsize(target) / 1e6:.1f} MB graph)")


if __name__ == "__main__":
    main()
