"""The vocabulary shortlist at run time: the target tokens a batch may produce, and the decoder step over them alone.

``Shortlist`` reads a vocabulary map in CTranslate2's vmap format (``lite data shortlist`` writes one; so does any
tool that writes vmaps): ``src_1 ... src_n<TAB>tgt_1 ... tgt_k`` lines, an empty source n-gram naming the tokens
that are always candidates. A batch's candidates are those, eos and unk, and the targets of every source n-gram
in the batch, sorted by id (the order keeps the step's ties as without a shortlist).

``shortlisted_step`` rewrites a decoder-step graph (fp32, int8, compact or not) to take ``vocabulary`` int64 [C]
and project onto those C tokens only: the output projection's weight (and its per-column int8 zero points and
scales) gathered to C columns, the log-softmax over the C tokens (normalised over the shortlist, as CTranslate2
and Marian do), the search penalties on their ids, and ``cand_tokens`` mapped back to token ids. ``log_probs``
is then [N, C]. With every token as the vocabulary the step gives what the plain graph gives.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from export.candidates import OUTPUTS
from export.model_dir import ModelDirError

PROJECTIONS = ("MatMul", "MatMulInteger")  # what the output projection is exported or quantized to
INPUT = "vocabulary"
NO_REPEAT = "no_repeat_ngram_size needs the whole vocabulary's log-probs: it cannot be combined with a shortlist"


class ShortlistError(ModelDirError):
    """A vocabulary map or decoder-step graph that the shortlist cannot use."""


class Shortlist:
    """A vmap file's rules over a model's target symbols."""

    def __init__(self, path: str | Path, symbols: Sequence[str], always: Sequence[int]):
        from lite.text import read_lines

        index = {s: i for i, s in enumerate(symbols)}
        self.rules: list[dict[tuple[str, ...], np.ndarray]] = []  # n-gram length - 1 -> {n-gram: token ids}
        fixed, named = set(always), False
        for number, line in enumerate(read_lines(path), 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise ShortlistError(f"{path}:{number}: not a vocabulary map line (source n-gram<TAB>target tokens)")
            source, target = line.split("\t", 1)
            ids = [index[t] for t in target.split() if t in index]  # a token the model lacks cannot be produced
            named = named or bool(ids)
            if not source.strip():
                fixed.update(ids)
                continue
            ngram = tuple(source.split())
            while len(self.rules) < len(ngram):
                self.rules.append({})
            self.rules[len(ngram) - 1][ngram] = np.array(ids, dtype=np.int64)
        if not named:
            raise ShortlistError(f"{path}: no vocabulary map entry names a token of this model's target dictionary")
        self.fixed = np.array(sorted(fixed), dtype=np.int64)

    def candidates(self, sentences: Sequence[Sequence[str]], at_least: int = 1) -> np.ndarray:
        """The source pieces of a batch -> its candidate token ids, int64 [C], sorted; topped up with the lowest
        other ids to ``at_least`` (a beam search needs 2 * beam candidates)."""
        found = [self.fixed]
        for pieces in sentences:
            for n, rules in enumerate(self.rules, 1):
                for i in range(len(pieces) - n + 1):
                    ids = rules.get(tuple(pieces[i:i + n]))
                    if ids is not None:
                        found.append(ids)
        chosen = np.unique(np.concatenate(found))
        if len(chosen) < at_least:
            chosen = np.union1d(chosen, np.setdiff1d(np.arange(at_least + len(chosen)), chosen)[:at_least - len(chosen)])
        return chosen


def shortlisted_step(model, vocab_size: int):
    """A decoder-step ``onnx.ModelProto`` with in-graph candidates -> the same step over ``vocabulary`` [C]
    (a new model; the given one is left as it is)."""
    from onnx import TensorProto, helper, shape_inference

    model = _copy(model)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    initializers = {i.name: i for i in g.initializer}
    if not set(OUTPUTS) <= {o.name for o in g.output}:
        raise ShortlistError("the decoder-step graph has no in-graph candidates: re-export the model with `lite export`")
    chain = _projection_chain(producer)  # projection first, LogSoftmax last
    shapes = _shapes(shape_inference.infer_shapes(model), initializers)
    added: list = []

    def gather(name: str, axis: int) -> str:  # ``name`` restricted to the shortlist along ``axis``
        out = f"shortlist/{name}"
        added.append(helper.make_node("Gather", [name, INPUT], [out], name=f"shortlist/Gather_{len(added)}", axis=axis))
        return out

    projection = chain[0]
    weight = projection.input[1]  # [C, V], or Transpose of [V, C]
    source = producer.get(weight)
    if weight in initializers and shapes.get(weight, [])[-1:] == [vocab_size]:
        projection.input[1] = gather(weight, 1)
    elif source is not None and source.op_type == "Transpose" and shapes.get(source.input[0], [])[:1] == [vocab_size]:
        transposed = f"shortlist/{weight}"
        added.append(helper.make_node("Transpose", [gather(source.input[0], 0)], [transposed],
                                      name="shortlist/Transpose", perm=[1, 0]))
        projection.input[1] = transposed
    else:
        raise ShortlistError(f"the output projection {projection.name or projection.op_type}: its weight {weight!r} "
                             f"is not a [C, {vocab_size}] tensor or the transpose of a [{vocab_size}, C] one")
    if projection.op_type == "MatMulInteger" and len(projection.input) > 3 and \
            shapes.get(projection.input[3]) == [vocab_size]:
        projection.input[3] = gather(projection.input[3], 0)  # per-column zero points [V]
    for node in chain[1:]:
        for position, name in enumerate(node.input):
            if name in (n.output[0] for n in chain):
                continue
            dims = shapes.get(name, [])
            if node.op_type in ("Mul", "Add", "Sub", "Div") and dims[-1:] == [vocab_size]:
                node.input[position] = gather(name, len(dims) - 1)  # per-column scales or biases
            elif node.op_type == "Reshape" and position == 1:
                node.input[1] = _reshape_target(name, initializers, producer, vocab_size, added)
    _candidates_over_shortlist(g, added)
    g.node.extend(added)
    g.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, ["shortlist"]))
    _topological_sort(g)
    used = {name for n in g.node for name in n.input} | {o.name for o in g.output}
    for orphan in [i for i in g.initializer if i.name not in used]:  # e.g. the Reshape target replaced above
        g.initializer.remove(orphan)
    for orphan in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(orphan)
    for output in g.output:
        if output.name == "log_probs":
            output.type.tensor_type.shape.dim[-1].dim_param = "shortlist"
    return model


def _copy(model):
    from onnx import ModelProto

    copy = ModelProto()
    copy.CopyFrom(model)
    return copy


def _projection_chain(producer: dict) -> list:
    """The nodes from the output projection to the LogSoftmax that makes ``log_probs``, following first inputs."""
    node, chain = producer.get("log_probs"), []
    while node is not None and node.op_type not in PROJECTIONS:
        chain.append(node)
        node = producer.get(node.input[0])
    if node is None or not chain or chain[0].op_type != "LogSoftmax":
        raise ShortlistError("the decoder-step graph's log_probs do not come from a LogSoftmax over a MatMul")
    return [node, *reversed(chain)]


def _shapes(inferred, initializers: dict) -> dict:
    """{tensor: its dims} where they are all known: initializers, and what ONNX's shape inference finds."""
    shapes = {i.name: list(i.dims) for i in initializers.values()}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims) and info.type.tensor_type.HasField("shape"):
            shapes.setdefault(info.name, [d.dim_value for d in dims])
    return shapes


def _reshape_target(name: str, initializers: dict, producer: dict, vocab_size: int, added: list) -> str:
    """A constant Reshape target with ``vocab_size`` in it -> the same with the shortlist's length there."""
    from onnx import helper, numpy_helper

    if name in initializers:
        shape = numpy_helper.to_array(initializers[name])
    elif name in producer and producer[name].op_type == "Constant":
        shape = numpy_helper.to_array(producer[name].attribute[0].t)
    else:
        raise ShortlistError(f"the projection's Reshape target {name!r} is not a constant")
    if list(shape).count(vocab_size) != 1:
        return name  # the vocabulary is not in it (e.g. a -1 takes it)
    at = list(shape).index(vocab_size)
    parts = [numpy_helper.from_array(shape[:at].astype(np.int64), "shortlist/shape_before"),
             numpy_helper.from_array(shape[at + 1:].astype(np.int64), "shortlist/shape_after")]
    added.append(helper.make_node("Shape", [INPUT], ["shortlist/length"], name="shortlist/Shape"))
    added.append(helper.make_node("Constant", [], ["shortlist/shape_before"], value=parts[0], name="shortlist/before"))
    added.append(helper.make_node("Constant", [], ["shortlist/shape_after"], value=parts[1], name="shortlist/after"))
    added.append(helper.make_node("Concat", ["shortlist/shape_before", "shortlist/length", "shortlist/shape_after"],
                                  ["shortlist/shape"], name="shortlist/Concat", axis=0))
    return "shortlist/shape"


def _candidates_over_shortlist(g, added: list) -> None:
    """The penalties' column ids are the shortlist's tokens, and ``cand_tokens`` positions in it mapped to them."""
    from onnx import helper

    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    columns = [n for n in g.node if n.op_type == "Range"  # the column ids that the penalties compare with
               and any(c.op_type == "Equal" for c in consumers.get(n.output[0], []))]
    tokens = [n for n in g.node if "cand_tokens" in n.output]
    if len(columns) != 1 or len(tokens) != 1:
        raise ShortlistError("the decoder-step graph's candidates are not those export/candidates.py adds")
    g.node.remove(columns[0])
    added.append(helper.make_node("Identity", [INPUT], [columns[0].output[0]], name="shortlist/columns"))
    tokens[0].output[0] = "shortlist/positions"
    added.append(helper.make_node("Gather", [INPUT, "shortlist/positions"], ["cand_tokens"], name="shortlist/tokens",
                                  axis=0))


def _topological_sort(g) -> None:
    """Order ``g.node`` so that every node comes after the producers of its inputs (ONNX requires it)."""
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    waiting: dict[str, list[int]] = {}  # tensor -> the nodes that wait for it
    missing = []
    for index, node in enumerate(g.node):
        needs = {i for i in node.input if i not in available}
        missing.append(len(needs))
        for name in needs:
            waiting.setdefault(name, []).append(index)
    ready = [i for i, count in enumerate(missing) if count == 0]
    ordered = []
    while ready:
        node = g.node[ready.pop()]
        ordered.append(node)
        for name in node.output:
            for index in waiting.pop(name, []):
                missing[index] -= 1
                if missing[index] == 0:
                    ready.append(index)
    if len(ordered) != len(g.node):
        raise ShortlistError("the rewritten decoder-step graph has a cycle or an input that nothing makes")
    nodes = [type(n)() for n in ordered]
    for copy, node in zip(nodes, ordered):
        copy.CopyFrom(node)
    del g.node[:]
    g.node.extend(nodes)
