"""The compact int8 model dir: every weight stored once, the embedding tables in int8 (``lite compress quantize``'s
default layout; ``--no-compact`` keeps one self-contained file per graph).

    DIR/encoder.onnx, DIR/decoder_step.onnx   the graphs, weights left out (a few hundred KB)
    DIR/weights.bin                           ONNX external data of both graphs: each distinct tensor once

What changes in the dynamically quantized graphs:
- an embedding lookup ``Gather(table fp32 [V, C], ids)`` becomes ``Gather(table int8 [V, C], ids) * Gather(scale
  [V], ids)``: int8 rows with one symmetric scale per row (per token), dequantized after the lookup, row by row;
- the output projection tied to that table (``quantize_dynamic`` stores it as int8 [C, V] with one scale per output
  column, i.e. per token) reads the same int8 table through a ``Transpose`` and the same scales: the lookup table
  *is* the projection's int8 weight, so the projection is bit for bit what ``--no-compact`` computes;
- a lookup in a sinusoidal position table becomes its computation (sin, cos of position x frequency): no table;
- every initializer (or constant) of at least ``EXTERNAL_BYTES`` goes to ``weights.bin``, tensors equal in type, shape and bytes
  (the shared table, positional tables, ...) written once and referenced by both graphs.

The only numerical change from ``--no-compact`` is the embedding lookups in int8 (per-row scales); ``validate``
measures it: the SQNR of each graph's worst float output (encoder states, decoder step log-probs, caches) against
the fp32 graphs, beside the same figures of the ``--no-compact`` graphs, on real feeds
(``compress.calibration.CalibrationData``).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Dict, Iterable, List

import numpy as np

from compress.errors import QuantizeError
from export.model_dir import GRAPHS

WEIGHTS = "weights.bin"
EXTERNAL_BYTES = 1024  # smaller initializers stay inside their graph
ALIGN = 64  # byte alignment of each tensor in WEIGHTS


def per_row_int8(table: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per row, ONNX Runtime's formula and range (``quant_utils``).

    table: float32 [V, C] -> (int8 [V, C], scale float32 [V]); a row of zeros gets scale 1."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = (float(v) for v in get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range, symmetric=True))
    absmax = np.abs(table).max(axis=1).astype(np.float32)  # [V]
    scale = np.where(absmax > 0, np.float32(2) * absmax / np.float32(qmax - qmin), np.float32(1)).astype(np.float32)
    q = np.clip(np.round(table / scale[:, None]), qmin, qmax).astype(np.int8)
    return q, scale


class _Graph:
    """A loaded ONNX model with lookups by tensor name."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model, self.to_array = model, numpy_helper.to_array
        self.initializers = {i.name: i for i in model.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        return self.to_array(self.initializers[name])

    def consumers(self, name: str) -> list:
        return [n for n in self.model.graph.node if name in n.input]

    def replace_initializer(self, name: str, array: np.ndarray) -> None:
        from onnx import numpy_helper

        if name in self.initializers:
            self.model.graph.initializer.remove(self.initializers[name])
        tensor = numpy_helper.from_array(array, name)
        self.model.graph.initializer.append(tensor)
        self.initializers[name] = tensor

    def drop_unused(self) -> None:
        used = {i for n in self.model.graph.node for i in n.input}
        for name in [n for n in self.initializers if n not in used]:
            self.model.graph.initializer.remove(self.initializers.pop(name))


def _embedding_gathers(graph: _Graph) -> list:
    """Gathers of rows (axis 0) whose table (input 0) is a 2-D fp32 initializer looked up by token ids: the
    embeddings (a lookup along axis 1, e.g. the Synthesizer's columns by position, is not one)."""
    from onnx import TensorProto, helper

    def rows(node) -> bool:
        return all(helper.get_attribute_value(a) == 0 for a in node.attribute if a.name == "axis")

    return [n for n in graph.model.graph.node if n.op_type == "Gather" and n.input[0] in graph.initializers
            and graph.initializers[n.input[0]].data_type == TensorProto.FLOAT
            and len(graph.initializers[n.input[0]].dims) == 2 and graph.initializers[n.input[0]].dims[0] > 2
            and rows(n)]


def _int8_lookup(graph: _Graph, gather, table: str, scale: str) -> None:
    """Replace ``gather`` (fp32 table) by an int8 row lookup and its per-row scale; same output tensor."""
    from onnx import TensorProto, helper

    out, ids, base = gather.output[0], gather.input[1], gather.name or gather.output[0]
    nodes = [helper.make_node("Gather", [table, ids], [f"{base}/rows_int8"], name=f"{base}/int8"),
             helper.make_node("Cast", [f"{base}/rows_int8"], [f"{base}/rows"], to=TensorProto.FLOAT, name=f"{base}/cast"),
             helper.make_node("Gather", [scale, ids], [f"{base}/scale"], name=f"{base}/scale"),
             helper.make_node("Unsqueeze", [f"{base}/scale", "compact.last_axis"], [f"{base}/scale_1"],
                              name=f"{base}/unsqueeze"),
             helper.make_node("Mul", [f"{base}/rows", f"{base}/scale_1"], [out], name=f"{base}/dequantize")]
    graph_nodes = graph.model.graph.node
    at = list(graph_nodes).index(gather)
    graph_nodes.remove(gather)
    for i, node in enumerate(nodes):
        graph_nodes.insert(at + i, node)
    if "compact.last_axis" not in graph.initializers:
        graph.replace_initializer("compact.last_axis", np.array([-1], dtype=np.int64))


def _tied_projection(graph: _Graph, table: np.ndarray):
    """The dynamically quantized MatMul whose fp32 weight was ``table`` transposed, as (MatMulInteger node, int8
    weight name, scale name), or None. Recognised by value: its int8 weight [C, V] dequantized is within one
    quantization step of ``table.T`` everywhere."""
    for node in graph.model.graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in graph.initializers:
            continue
        weight = node.input[1]
        scale = weight.removesuffix("_quantized") + "_scale"
        if scale not in graph.initializers or tuple(graph.initializers[weight].dims) != table.shape[::-1]:
            continue
        q, s = graph.array(weight), graph.array(scale)  # [C, V], [V]
        if s.shape == (table.shape[0],) and np.all(np.abs(q * s - table.T) <= s * 0.5001 + 1e-7):
            return node, weight, scale
    return None


def compact_graphs(int8_graphs: Dict[str, Path], reduce_range: bool) -> Dict[str, object]:
    """The quantized graphs with int8 embedding tables, the tied output projection sharing its table; returns
    {graph: onnx.ModelProto} (weights still inside) — ``save_with_shared_weights`` writes them. The decoder step
    goes first: where its output projection is tied to a table, that projection's int8 weight becomes the table."""
    import onnx

    float_tables = {}  # table bytes -> (int8 name, scale name): equal tables get one name in both graphs
    int8_tables = {}  # int8 name -> (int8 [V, C], scale [V])
    out = {}
    for g in ("decoder_step", "encoder"):
        graph = _Graph(onnx.load(str(int8_graphs[g])))
        for gather in _embedding_gathers(graph):
            table = graph.array(gather.input[0])  # [V, C]
            key = hashlib.sha256(table.tobytes()).hexdigest()
            if key not in float_tables:
                index = len(float_tables)
                float_tables[key] = (f"compact.embedding{index}.int8", f"compact.embedding{index}.scale")
            q_name, s_name = float_tables[key]
            tied = _tied_projection(graph, table)
            if q_name not in int8_tables:  # quantized once: by the tied projection when there is one
                q, s = (graph.array(tied[1]).T, graph.array(tied[2])) if tied else per_row_int8(table, reduce_range)
                int8_tables[q_name] = (np.ascontiguousarray(q), s)
            q, s = int8_tables[q_name]
            graph.replace_initializer(q_name, q)
            graph.replace_initializer(s_name, s)
            _int8_lookup(graph, gather, q_name, s_name)
            if tied is not None:  # the projection reads the lookup table, transposed
                node, weight, scale = tied
                if not np.array_equal(graph.array(weight), q.T) or not np.array_equal(graph.array(scale), s):
                    raise QuantizeError(f"{int8_graphs[g]}: the output projection's int8 weight differs from its "
                                        f"embedding table's; cannot share them")
                transposed = f"{q_name}.T"
                node.input[1] = transposed
                at = list(graph.model.graph.node).index(node)
                graph.model.graph.node.insert(at, onnx.helper.make_node("Transpose", [q_name], [transposed],
                                                                        perm=[1, 0], name=f"{q_name}/transpose"))
                for consumer in graph.consumers(scale):
                    consumer.input[list(consumer.input).index(scale)] = s_name
        graph.drop_unused()
        out[g] = graph.model
    return out


def sinusoidal_table(rows: int, dim: int, padding_idx: int) -> np.ndarray:
    """fairseq's ``SinusoidalPositionalEmbedding.get_embedding`` in numpy: float32 [rows, dim], even ``dim``."""
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * -np.float32(math.log(10000) / (half - 1)))  # [half]
    angles = np.arange(rows, dtype=np.float32)[:, None] * freq[None, :]  # [rows, half]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    table[padding_idx] = 0
    return table


def _sinusoidal_padding(table: np.ndarray) -> int | None:
    """The padding row of a fairseq sinusoidal position table (its one zero row), or None for any other table."""
    rows, dim = table.shape
    zero = np.flatnonzero(~table.any(axis=1))
    if dim % 2 or dim < 4 or len(zero) != 1:
        return None
    return int(zero[0]) if np.allclose(table, sinusoidal_table(rows, dim, int(zero[0])), atol=1e-4) else None


def _computed_positions(model) -> int:
    """Replace each lookup in a sinusoidal position table (a ``Constant``) by the sines and cosines computed from
    the positions; returns how many tables went. Shape: positions int64 [...] -> [..., dim]."""
    from onnx import TensorProto, helper, numpy_helper

    gone = 0
    for const in [n for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]:
        table = numpy_helper.to_array(const.attribute[0].t)
        if table.ndim != 2 or table.dtype != np.float32:
            continue
        padding = _sinusoidal_padding(table)
        gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == const.output[0]]
        users = [n for n in model.graph.node if const.output[0] in n.input]
        if padding is None or not gathers or len(gathers) != len(users):
            continue
        half = table.shape[1] // 2
        base = const.output[0]
        consts = {f"{base}/freq": np.exp(np.arange(half, dtype=np.float32) * -np.float32(math.log(10000) / (half - 1))),
                  f"{base}/padding": np.array(padding, dtype=np.int64), f"{base}/zero": np.array(0, dtype=np.float32),
                  f"{base}/last": np.array([-1], dtype=np.int64)}
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        for i, gather in enumerate(gathers):
            p, out, tag = gather.input[1], gather.output[0], f"{base}/{i}"
            nodes = [helper.make_node("Cast", [p], [f"{tag}/p"], to=TensorProto.FLOAT),
                     helper.make_node("Unsqueeze", [f"{tag}/p", f"{base}/last"], [f"{tag}/p1"]),
                     helper.make_node("Mul", [f"{tag}/p1", f"{base}/freq"], [f"{tag}/angles"]),
                     helper.make_node("Sin", [f"{tag}/angles"], [f"{tag}/sin"]),
                     helper.make_node("Cos", [f"{tag}/angles"], [f"{tag}/cos"]),
                     helper.make_node("Concat", [f"{tag}/sin", f"{tag}/cos"], [f"{tag}/table"], axis=-1),
                     helper.make_node("Equal", [p, f"{base}/padding"], [f"{tag}/is_pad"]),
                     helper.make_node("Unsqueeze", [f"{tag}/is_pad", f"{base}/last"], [f"{tag}/is_pad1"]),
                     helper.make_node("Where", [f"{tag}/is_pad1", f"{base}/zero", f"{tag}/table"], [out])]
            for node in nodes:  # named: tools key nodes by name
                node.name = f"{tag}/{node.op_type}_{node.output[0].split('/')[-1]}"
            at = list(model.graph.node).index(gather)
            model.graph.node.remove(gather)
            for j, node in enumerate(nodes):
                model.graph.node.insert(at + j, node)
        model.graph.node.remove(const)
        gone += 1
    return gone


def _constants_to_initializers(model) -> None:
    """Large ``Constant`` nodes (the exporter folds e.g. the sinusoidal position table into one) as initializers,
    so that they are stored externally, and once, too."""
    from onnx import numpy_helper

    for node in [n for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]:
        array = numpy_helper.to_array(node.attribute[0].t)
        if array.nbytes >= EXTERNAL_BYTES:
            model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            model.graph.node.remove(node)


MATMULS = ("MatMul", "Gemm", "MatMulInteger")


def _short_names(model) -> None:
    """Name the inner tensors by short numbers and drop node names: the exporter's names are paths
    (``/decoder/layers.0/self_attn/Reshape_3_output_0``), most of a graph file's bytes. Kept: graph inputs and
    outputs (model.json's ``io``), initializers, and the names of the matmuls and of their fp32 results (a
    MatMulInteger's dequantizing Mul), which tie each quantized matmul to the fp32 graph's
    (``compress.quantize.sqnr_per_matmul``). A graph with subgraphs (If, Loop) is left as it is."""
    from onnx import AttributeProto

    graph = model.graph
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    producer = {o: n for n in graph.node for o in n.output}

    def dequantizes(node) -> bool:  # Mul(Cast(MatMulInteger(...)), scale)
        cast = producer.get(node.input[0]) if node.op_type == "Mul" else None
        return cast is not None and cast.op_type == "Cast" and producer.get(cast.input[0]) is not None \
            and producer[cast.input[0]].op_type == "MatMulInteger"

    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    keep |= {"", *(o for n in graph.node if n.op_type in ("MatMul", "Gemm") or dequantizes(n) for o in n.output)}
    names: Dict[str, str] = {}

    def short(name: str) -> str:
        return name if name in keep else names.setdefault(name, np.base_repr(len(names), 36))

    for node in graph.node:
        node.input[:] = [short(i) for i in node.input]
        node.output[:] = [short(o) for o in node.output]
        if node.op_type not in MATMULS:
            node.name = ""
    del graph.value_info[:]


def save_with_shared_weights(models: Dict[str, object], out: Path) -> Dict[str, int]:
    """Write ``out/<graph>.onnx`` with every initializer of ``EXTERNAL_BYTES`` or more in ``out/WEIGHTS``, each
    distinct tensor (type, shape, bytes) once, sinusoidal position tables replaced by their computation; returns
    {"tensors", "shared", "bytes"} of WEIGHTS and how many position tables are now computed. Inner tensors and nodes
    get short names (``_short_names``)."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    computed = 0
    for g in GRAPHS:
        computed += _computed_positions(models[g])
        _constants_to_initializers(models[g])
        _short_names(models[g])
    offsets: Dict[tuple, tuple] = {}
    shared = 0
    with open(out / WEIGHTS, "wb") as f:
        for g in GRAPHS:
            for tensor in models[g].graph.initializer:
                raw = numpy_helper.to_array(tensor).tobytes()
                if len(raw) < EXTERNAL_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest())
                if key in offsets:
                    shared += 1
                else:
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    offsets[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = offsets[key]
                tensor.ClearField("float_data"), tensor.ClearField("int32_data"), tensor.ClearField("int64_data")
                tensor.raw_data = b""
                set_external_data(tensor, WEIGHTS, offset, length)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
        size = f.tell()
    for g in GRAPHS:
        onnx.save(models[g], str(out / f"{g}.onnx"))
        onnx.checker.check_model(str(out / f"{g}.onnx"))
    return {"tensors": len(offsets), "shared": shared, "bytes": size, "computed_position_tables": computed}


def pack_weights(out: Path, min_saving: float = 0.05) -> dict | None:
    """Store ``out/WEIGHTS`` as ``out/PACKED`` (sparse tensors as bitmask + non-zero bytes, see
    ``export.packed_weights``) when that saves at least ``min_saving`` of its bytes; returns model.json's ``packed``
    entry, or None (nothing sparse enough: ``WEIGHTS`` stays)."""
    import onnx

    from export.packed_weights import PACKED, pack, unpack

    dense = (out / WEIGHTS).read_bytes()
    tensors = set()
    for g in GRAPHS:
        model = onnx.load(str(out / f"{g}.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            where = {e.key: e.value for e in t.external_data}
            if where.get("location") == WEIGHTS:
                tensors.add((int(where.get("offset", 0)), int(where["length"])))
    packed, segments = pack(dense, tensors)
    if len(packed) > (1 - min_saving) * len(dense):
        return None
    digest = hashlib.sha256(dense).hexdigest()
    unpack(packed, segments, digest)  # lossless, or nothing is written
    (out / PACKED).write_bytes(packed)
    (out / WEIGHTS).unlink()
    return {"file": PACKED, "as": WEIGHTS, "bytes": len(dense), "sha256": digest, "segments": segments}


def _sqnr(reference: Iterable[np.ndarray], other: Iterable[np.ndarray]) -> float:
    """10 log10(sum x^2 / sum (x - y)^2) over all elements finite in both (log-probs are -inf where masked)."""
    signal = noise = 0.0
    for x, y in zip(reference, other):
        finite = np.isfinite(x) & np.isfinite(y)
        x, y = x[finite].astype(np.float64), y[finite].astype(np.float64)
        signal, noise = signal + float(np.sum(x * x)), noise + float(np.sum((x - y) ** 2))
    if noise == 0 or signal == 0:
        return math.inf if noise == 0 else -math.inf
    return round(10 * math.log10(signal / noise), 2)


def validate(float_graphs: Dict[str, Path], graphs: Dict[str, Dict[str, Path]], feeds: Dict[str, List[dict]]) -> dict:
    """SQNR (dB) of each graph against the fp32 graph's on ``feeds``, for each variant in ``graphs`` ({"compact":
    {graph: path}, "no_compact": {...}}): the lowest over the graph's float outputs, each summed over all feeds (a
    sum over all outputs would be the SQNR of the largest one, e.g. a cache of large states beside the log-probs)."""
    import onnxruntime as ort

    def run(path: Path, graph: str) -> Dict[str, List[np.ndarray]]:  # output name -> its value on each feed
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs() if o.type == "tensor(float)"]
        values = [session.run(names, feed) for feed in feeds[graph]]
        return {name: [v[i] for v in values] for i, name in enumerate(names)}

    report = {}
    for g in GRAPHS:
        reference = run(float_graphs[g], g)
        for variant, paths in graphs.items():
            outputs = run(paths[g], g)
            report.setdefault(variant, {})[g] = min(_sqnr(reference[name], outputs[name]) for name in reference)
    return report
