"""The beam candidates inside the decoder-step graph: search penalties, then the top ``k`` log-probs of each row.

Beam search keeps at most 2 * beam candidates per sentence, and the union of each row's top 2 * beam holds the
sentence's top 2 * beam over all its rows, so a per-row TopK in the graph is exact; on equal values ONNX's TopK
puts the lower index first, the order export/search.py sorts by. The step then hands numpy [N, k] instead of
[N, V]. What the search does to the log-probs before it selects, the graph does before its TopK, to the same values:

    NaN and pad -> -inf;  unk -= unk_penalty;  step >= max_len: every token but eos -> -inf;
    step < min_len: eos -> -inf

(the column penalties as one bias [V] added to the rows: x + (-p) is x - p in floating point, and -inf stays
-inf; NaN -> -inf after the TopK, on [N, k]: a NaN log-prob comes with a NaN row, see below). The graph's
``log_probs`` come from LogSoftmax, whose rows are all NaN where any entry is (a NaN or +inf logit).

from these inputs (``INPUTS``: values that leave the log-probs as they are, for a caller that only wants those):

    min_len int64 []    max_len int64 []    unk_penalty float32 []    k int64 [1]

Outputs added after the states: ``cand_scores`` float32 [N, k], ``cand_tokens`` int64 [N, k]. ``log_probs``
stays the first output (export validation compares it; ``no_repeat_ngram_size`` needs the hypotheses and runs
on it in numpy).
"""
from __future__ import annotations

import numpy as np

# the extra inputs, valued so that the log-probs pass unchanged (and one candidate is kept)
INPUTS = {"min_len": np.array(0, dtype=np.int64), "max_len": np.array(2 ** 62, dtype=np.int64),
          "unk_penalty": np.array(0.0, dtype=np.float32), "k": np.array([1], dtype=np.int64)}
OUTPUTS = ("cand_scores", "cand_tokens")


def add_candidates(model, pad: int, eos: int, unk: int) -> None:
    """Append the penalties and the TopK to a decoder-step ``onnx.ModelProto`` (in place)."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    for name, value in INPUTS.items():
        g.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                     list(value.shape)))
    consts = {"cand/pad": pad, "cand/eos": eos, "cand/unk": unk, "cand/zero": 0, "cand/one": 1}
    g.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in consts.items())
    g.initializer.append(numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), "cand/-inf"))
    g.initializer.extend([numpy_helper.from_array(np.array([0], dtype=np.int64), "cand/first"),
                          numpy_helper.from_array(np.array([0], dtype=np.int64), "cand/axis0")])
    def node(op: str, inputs: list, outputs: list, **attributes):  # named: tools (e.g. INC) key nodes by name
        return helper.make_node(op, inputs, outputs, name=f"cand/{op}_{outputs[0].split('/')[-1]}", **attributes)

    g.node.extend([  # a penalty per column [V], one Add over [N, V]: x + (-p) is x - p to the bit
        node("Shape", ["log_probs"], ["cand/shape"]),  # [2]: N, V
        node("Gather", ["cand/shape", "cand/one"], ["cand/V"], axis=0),
        node("Range", ["cand/zero", "cand/V", "cand/one"], ["cand/column"]),  # [V]
        node("Equal", ["cand/column", "cand/pad"], ["cand/is_pad"]),
        node("Equal", ["cand/column", "cand/eos"], ["cand/is_eos"]),
        node("Equal", ["cand/column", "cand/unk"], ["cand/is_unk"]),
        node("Not", ["cand/is_eos"], ["cand/not_eos"]),
        node("GreaterOrEqual", ["step", "max_len"], ["cand/at_max"]),
        node("And", ["cand/at_max", "cand/not_eos"], ["cand/only_eos"]),
        node("Less", ["step", "min_len"], ["cand/before_min"]),
        node("And", ["cand/before_min", "cand/is_eos"], ["cand/ban_eos"]),
        node("Or", ["cand/is_pad", "cand/only_eos"], ["cand/banned0"]),
        node("Or", ["cand/banned0", "cand/ban_eos"], ["cand/banned"]),
        node("Cast", ["cand/is_unk"], ["cand/unk_f"], to=TensorProto.FLOAT),
        node("Mul", ["cand/unk_f", "unk_penalty"], ["cand/unk_cost"]),  # [V]: the penalty at unk, 0 elsewhere
        node("Neg", ["cand/unk_cost"], ["cand/unk_bias"]),
        node("Where", ["cand/banned", "cand/-inf", "cand/unk_bias"], ["cand/bias"]),  # [V]
        node("Add", ["log_probs", "cand/bias"], ["cand/x"]),  # [N, V]; NaN stays NaN
        node("TopK", ["cand/x", "k"], ["cand/top_scores", "cand/top_tokens"], axis=-1, largest=1, sorted=1),
        # NaN -> -inf on [N, k], not [N, V]: LogSoftmax makes a row with a NaN all NaN, which fairseq makes all -inf,
        # whose top k are -inf at tokens 0 .. k-1 (equal values: lower index first)
        node("Gather", ["cand/top_scores", "cand/first"], ["cand/best"], axis=1),  # [N, 1]
        node("IsNaN", ["cand/best"], ["cand/nan_row"]),
        node("Squeeze", ["k", "cand/axis0"], ["cand/k_scalar"]),
        node("Range", ["cand/zero", "cand/k_scalar", "cand/one"], ["cand/first_k"]),  # [k]
        node("Where", ["cand/nan_row", "cand/-inf", "cand/top_scores"], ["cand_scores"]),
        node("Where", ["cand/nan_row", "cand/first_k", "cand/top_tokens"], ["cand_tokens"]),
    ])
    g.output.extend([helper.make_tensor_value_info("cand_scores", TensorProto.FLOAT, ["batch", "k"]),
                     helper.make_tensor_value_info("cand_tokens", TensorProto.INT64, ["batch", "k"])])
