#!/usr/bin/env python3
"""Fine-tune a pooled sentence encoder end to end on labelled, already tokenized texts.

    .venv-train/bin/python models/scripts/fine_tune.py --encoder runtime/encoders/minilm-l6 \\
        --train train.jsonl --dev dev.jsonl --labels 77 --out WORK [--epochs 3 --lr 5e-5 ...]

Run by `triage train --fine-tune`, which tokenizes with the worker's own tokenizer and writes
the JSONL files (one `{"ids": [...], "label": k}` per line); it then quantizes the result and fits
its heads on it as on any encoder. Needs PyPI `onnxruntime-training-cpu` 1.19.2 (its last
release; wheels for CPython 3.11 and 3.12 only), installed by `scripts/setup --train` into
.venv-train: no torch. Why each step:

- The encoder directory's graph dequantizes its int8 weights at load (Cast + Mul), which has
  no trainable parameter: ONNX Runtime's basic level folds them into plain fp32 initializers.
- ONNX Runtime's gradient builder for LayerNormalization needs the node's optional Mean and
  InvStdDev outputs, which inference exports leave out: they are added.
- A linear classifier over the graph's L2-normalised `sentence_embedding` (scaled: a cosine
  classifier, whose logits would otherwise be too flat for cross-entropy to move the encoder)
  gives the loss; only the encoder is exported again, so the heads are fitted afterwards on the
  fine-tuned embeddings exactly as on a frozen encoder.
- `onnxruntime.training`'s package __init__ imports torch: its submodules are imported under a
  stand-in package instead.

Early stopping: after every epoch the dev split (which the caller carved from the training part,
never from its validation rows) is classified; the best epoch's weights are kept and training
stops after `--patience` epochs without improvement. Progress goes to stdout, one JSON object a
line (`{"event": "step", ...}`), for the caller to show; errors go to stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types


def fail(message: str) -> None:
    print(f"fine_tune: {message}", file=sys.stderr)
    sys.exit(2)


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def import_training():
    try:
        import onnxruntime
    except ImportError:
        fail("onnxruntime is not installed here: run scripts/setup --train (it makes .venv-train)")
    training_dir = os.path.join(os.path.dirname(onnxruntime.__file__), "training")
    if not os.path.isdir(os.path.join(training_dir, "api")):
        fail(f"onnxruntime {onnxruntime.__version__} here has no training API: install onnxruntime-training-cpu "
             "(scripts/setup --train)")
    onnxruntime.set_default_logger_severity(3)
    stand_in = types.ModuleType("onnxruntime.training")
    stand_in.__path__ = [training_dir]
    sys.modules["onnxruntime.training"] = stand_in
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer
    return onnxruntime, artifacts, CheckpointState, Module, Optimizer


def read_rows(path: str, labels: int) -> list[tuple[list[int], int]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                ids, label = [int(i) for i in record["ids"]], int(record["label"])
            except (ValueError, KeyError, TypeError) as e:
                fail(f"{path}:{n}: not a {{\"ids\": [...], \"label\": k}} line ({e})")
            if not ids or not 0 <= label < labels:
                fail(f"{path}:{n}: empty ids or label {label} outside 0..{labels - 1}")
            rows.append((ids, label))
    if not rows:
        fail(f"{path}: no rows")
    return rows


def trainable_graph(ort, encoder_path: str, labels: int, scale: float, seed: int, work: str) -> str:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folded = os.path.join(work, "folded.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = folded
    ort.InferenceSession(encoder_path, options, providers=["CPUExecutionProvider"])
    model = onnx.load(folded)
    g = model.graph
    quantized = [n.op_type for n in g.node if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul")]
    if quantized:
        fail(f"{encoder_path} is int8-quantized ({quantized[0]} nodes have no gradient): fine-tune its fp32 "
             "source (e.g. runtime/encoders/minilm-l6) and let triage quantize the result")
    if "sentence_embedding" not in [o.name for o in g.output]:
        fail(f"{encoder_path} has no sentence_embedding output: give an encoder directory made by build_encoder.py")
    for node in g.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([node.output[0] + "_mean", node.output[0] + "_inv_std_dev"])
    dim = next(o for o in g.output if o.name == "sentence_embedding").type.tensor_type.shape.dim[-1].dim_value
    rng = np.random.default_rng(seed)
    g.initializer.extend([
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "fine_tune_scale"),
        numpy_helper.from_array((rng.standard_normal((dim, labels)) * 0.02).astype(np.float32), "fine_tune_weight"),
        numpy_helper.from_array(np.zeros(labels, dtype=np.float32), "fine_tune_bias"),
    ])
    g.node.extend([
        helper.make_node("Mul", ["sentence_embedding", "fine_tune_scale"], ["fine_tune_scaled"]),
        helper.make_node("Gemm", ["fine_tune_scaled", "fine_tune_weight", "fine_tune_bias"], ["logits"]),
    ])
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels]))
    path = os.path.join(work, "trainable.onnx")
    onnx.save(model, path, save_as_external_data=False)
    return path


def parameters(path: str) -> list[str]:
    """Every float initializer with more than one element: weights, biases, norms, embeddings
    (scalars are the graph's constants: epsilons, scales, mask fill values)."""
    import numpy as np
    import onnx
    from onnx import TensorProto

    model = onnx.load(path)
    return [i.name for i in model.graph.initializer
            if i.data_type == TensorProto.FLOAT and int(np.prod(i.dims)) > 1]


def batches(rows, size: int, rng):
    """Shuffled, then grouped by length within windows of 50 batches: less padding, still random."""
    import numpy as np

    order = rng.permutation(len(rows))
    window = size * 50
    out = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(rows[i][0]))
        out.extend(chunk[i:i + size] for i in range(0, len(chunk), size))
    rng.shuffle(out)
    return [np.array(b) for b in out]


def tensors(rows, indices):
    import numpy as np

    width = max(len(rows[i][0]) for i in indices)
    ids = np.zeros((len(indices), width), dtype=np.int64)
    mask = np.zeros((len(indices), width), dtype=np.int64)
    for r, i in enumerate(indices):
        tokens = rows[i][0]
        ids[r, :len(tokens)] = tokens
        mask[r, :len(tokens)] = 1
    labels = np.array([rows[i][1] for i in indices], dtype=np.int64)
    return ids, mask, np.zeros_like(ids), labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", required=True, help="fp32 encoder directory (model.onnx with sentence_embedding)")
    ap.add_argument("--train", required=True)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--labels", type=int, required=True)
    ap.add_argument("--out", required=True, help="work directory; the result is OUT/model.onnx")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--patience", type=int, default=1)
    ap.add_argument("--lr", type=float, default=8e-5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=0.06, help="share of the steps with a rising learning rate")
    ap.add_argument("--scale", type=float, default=20.0, help="the cosine classifier's logit scale")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: no limit; for tests)")
    args = ap.parse_args()
    if args.labels < 2:
        fail("need at least 2 labels")
    encoder_path = os.path.join(args.encoder, "model.onnx")
    if not os.path.isfile(encoder_path):
        fail(f"{encoder_path} not found")

    ort, artifacts, CheckpointState, Module, Optimizer = import_training()
    import numpy as np

    train_rows, dev_rows = read_rows(args.train, args.labels), read_rows(args.dev, args.labels)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        graph = trainable_graph(ort, encoder_path, args.labels, args.scale, args.seed, work)
        params = parameters(graph)
        import onnx
        # As a ModelProto, not a path: from a path onnxblock re-saves external data beside it and
        # newer onnx refuses to overwrite its own temp file.
        artifacts.generate_artifacts(
            onnx.load(graph), requires_grad=params, loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=artifacts.OptimType.AdamW, artifact_directory=work,
            loss_input_names=["logits"], additional_output_names=["logits"])
        state = CheckpointState.load_checkpoint(os.path.join(work, "checkpoint"))
        session = ort.SessionOptions()
        session.log_severity_level = 3
        if args.threads:
            session.intra_op_num_threads = args.threads
        module = Module(os.path.join(work, "training_model.onnx"), state, os.path.join(work, "eval_model.onnx"),
                        device="cpu", session_options=session)
        optimizer = Optimizer(os.path.join(work, "optimizer_model.onnx"), module)
        emit("start", parameters=len(params), train=len(train_rows), dev=len(dev_rows), seconds=round(time.time() - started, 1))

        initial = np.array(module.get_contiguous_parameters(trainable_only=True).numpy(), copy=True)
        rng = np.random.default_rng(args.seed)
        steps_per_epoch = (len(train_rows) + args.batch - 1) // args.batch
        total = steps_per_epoch * args.epochs
        if args.max_steps:
            total = min(total, args.max_steps)
        warmup = max(1, int(total * args.warmup))
        step = 0
        best = (-1.0, -1, None)  # dev accuracy, epoch, parameters
        history = []
        for epoch in range(1, args.epochs + 1):
            module.train()
            losses = []
            for indices in batches(train_rows, args.batch, rng):
                if step >= total:
                    break
                lr = args.lr * (step + 1) / warmup if step < warmup else args.lr * max(0.0, (total - step) / (total - warmup))
                optimizer.set_learning_rate(lr)
                ids, mask, types_, labels = tensors(train_rows, indices)
                loss, _ = module(ids, mask, types_, labels)
                optimizer.step()
                module.lazy_reset_grad()
                step += 1
                loss = float(loss)
                if not np.isfinite(loss):
                    fail(f"the loss became {loss} at step {step} (epoch {epoch}): lower --lr")
                losses.append(loss)
                emit("step", epoch=epoch, step=step, total=total, loss=round(loss, 4), lr=lr)
            module.eval()
            correct = 0
            for start in range(0, len(dev_rows), 64):
                indices = list(range(start, min(start + 64, len(dev_rows))))
                ids, mask, types_, labels = tensors(dev_rows, indices)
                _, logits = module(ids, mask, types_, labels)
                correct += int((np.asarray(logits).argmax(axis=1) == labels).sum())
            accuracy = correct / len(dev_rows)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                            "dev_accuracy": accuracy, "seconds": round(time.time() - started, 1)})
            emit("epoch", **history[-1])
            if accuracy > best[0]:
                best = (accuracy, epoch, np.array(module.get_contiguous_parameters(trainable_only=True).numpy(), copy=True))
            elif epoch - best[1] >= args.patience and epoch < args.epochs:
                emit("early_stop", epoch=epoch, best_epoch=best[1])
                break
            if step >= total:
                break
        if best[1] != history[-1]["epoch"]:
            module.copy_buffer_to_parameters(ort.OrtValue.ortvalue_from_numpy(best[2])._ortvalue, trainable_only=True)
        final = np.asarray(module.get_contiguous_parameters(trainable_only=True).numpy())
        # How far training moved the weights (relative L2): 0 would mean nothing was learned.
        change = float(np.linalg.norm(final - initial) / max(np.linalg.norm(initial), 1e-12))
        target = os.path.join(args.out, "model.onnx")
        module.export_model_for_inferencing(target + ".tmp", ["sentence_embedding"])
        os.replace(target + ".tmp", target)
    summary = {"best_epoch": best[1], "best_dev_accuracy": best[0], "parameter_change": change, "epochs": history, "steps": step,
               "parameters": len(params), "seconds": round(time.time() - started, 1), "seed": args.seed,
               "lr": args.lr, "batch": args.batch, "scale": args.scale, "optimizer": "AdamW (weight decay 0.01)",
               "onnxruntime_training": ort.__version__}
    with open(os.path.join(args.out, "fine_tune.json"), "w") as f:
        json.dump(summary, f, indent=2)
    emit("done", **{k: summary[k] for k in ("best_epoch", "best_dev_accuracy", "steps", "seconds")})


if __name__ == "__main__":
    main()
