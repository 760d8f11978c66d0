"""Helpers shared by the model scripts: text assembly and embedding, the same way the worker does."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def load_tokenizer(path: str, max_length: int) -> Tokenizer:
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def session(model_path: str, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


def run_batched(sess: ort.InferenceSession, tok: Tokenizer, texts: list[str], outputs: list[str],
                batch_size: int = 64, progress: bool = True) -> list[np.ndarray]:
    """Run texts through the graph in length-sorted batches; rows come back in input order."""
    encs = tok.encode_batch(texts)
    order = np.argsort([len(e.ids) for e in encs], kind="stable")
    input_names = {i.name for i in sess.get_inputs()}
    results: list[list[np.ndarray]] = [[None] * len(texts) for _ in outputs]  # type: ignore
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encs[i].ids) for i in idx)
        ids = np.zeros((len(idx), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, i in enumerate(idx):
            n = len(encs[i].ids)
            ids[row, :n] = encs[i].ids
            mask[row, :n] = 1
            types[row, :n] = encs[i].type_ids
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in input_names:
            feed["token_type_ids"] = types
        outs = sess.run(outputs, feed)
        for k, out in enumerate(outs):
            for row, i in enumerate(idx):
                results[k][i] = out[row]
        if progress and (start // batch_size) % 20 == 0:
            print(f"  {min(start + batch_size, len(texts))}/{len(texts)}", flush=True)
    return [np.stack(r) for r in results]
