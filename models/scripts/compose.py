"""Compose an encoder ONNX graph with pooling and linear heads into ONE graph.

Why one graph: the Rust worker then runs a single ONNX Runtime session per batch (no
numpy-in-the-middle), and the Python reference and Rust see exactly the same computation.

Pooling is the sentence-transformers recipe for all-MiniLM-L6-v2: attention-masked mean of
last_hidden_state, then L2 normalisation. Heads are linear layers on the pooled embedding
followed by softmax (single-label) or sigmoid (multi-label).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EMBEDDING_OUTPUT = "sentence_embedding"


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name=name)


def add_pooling(model: onnx.ModelProto, hidden_output: str = "last_hidden_state") -> onnx.ModelProto:
    """Replace the encoder's outputs by an L2-normalised masked-mean `sentence_embedding`."""
    g = model.graph
    hidden = next(o for o in g.output if o.name == hidden_output)
    dim = hidden.type.tensor_type.shape.dim[-1].dim_value
    g.initializer.extend([
        _const("pool_axis_seq", np.array([1], dtype=np.int64)),
        _const("pool_axis_last", np.array([-1], dtype=np.int64)),
        _const("pool_eps_count", np.array(1e-9, dtype=np.float32)),
        _const("pool_eps_norm", np.array(1e-12, dtype=np.float32)),
    ])
    g.node.extend([
        helper.make_node("Cast", ["attention_mask"], ["pool_mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pool_mask_f", "pool_axis_last"], ["pool_mask_3d"]),
        helper.make_node("Mul", [hidden_output, "pool_mask_3d"], ["pool_masked"]),
        helper.make_node("ReduceSum", ["pool_masked", "pool_axis_seq"], ["pool_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["pool_mask_3d", "pool_axis_seq"], ["pool_count"], keepdims=0),
        helper.make_node("Max", ["pool_count", "pool_eps_count"], ["pool_count_safe"]),
        helper.make_node("Div", ["pool_sum", "pool_count_safe"], ["pool_mean"]),
        helper.make_node("Mul", ["pool_mean", "pool_mean"], ["pool_sq"]),
        helper.make_node("ReduceSum", ["pool_sq", "pool_axis_last"], ["pool_sqsum"], keepdims=1),
        helper.make_node("Sqrt", ["pool_sqsum"], ["pool_norm"]),
        helper.make_node("Max", ["pool_norm", "pool_eps_norm"], ["pool_norm_safe"]),
        helper.make_node("Div", ["pool_mean", "pool_norm_safe"], [EMBEDDING_OUTPUT]),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["batch", dim]))
    return model


def add_linear_head(model: onnx.ModelProto, output: str, weight: np.ndarray, bias: np.ndarray,
                    activation: str) -> onnx.ModelProto:
    """Append `output = activation(embedding @ weight.T + bias)`; weight is [labels, dim]."""
    g = model.graph
    w = f"{output}_weight"
    b = f"{output}_bias"
    g.initializer.extend([
        _const(w, np.ascontiguousarray(weight.T.astype(np.float32))),
        _const(b, bias.astype(np.float32)),
    ])
    logits = f"{output}_logits"
    g.node.append(helper.make_node("Gemm", [EMBEDDING_OUTPUT, w, b], [logits]))
    if activation == "softmax":
        g.node.append(helper.make_node("Softmax", [logits], [output], axis=-1))
    elif activation == "sigmoid":
        g.node.append(helper.make_node("Sigmoid", [logits], [output]))
    else:
        raise ValueError(f"unknown activation {activation!r}")
    g.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", weight.shape[0]]))
    return model


def pooled_encoder(encoder_path: str, hidden_output: str = "last_hidden_state") -> onnx.ModelProto:
    model = onnx.load(encoder_path)
    return add_pooling(model, hidden_output)


def save(model: onnx.ModelProto, path: str) -> None:
    onnx.checker.check_model(model)
    onnx.save(model, path)
