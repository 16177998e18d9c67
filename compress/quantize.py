"""Post-training int8 quantization of an exported model dir with ONNX Runtime: ``lite compress quantize``.

    lite compress quantize runs/export/lsra --out runs/export/lsra-int8 [--method ort-dynamic|ort-static|inc-tune]
        [--preset avx2|avx512_vnni|arm64] [--calibration FILE] [--max-bleu-drop 0.3 [--allow-loss]] [--force]
    lite translate --backend onnx --model runs/export/lsra-int8      # the same runtime, nothing to change

The output is a complete model dir (export/runtime.py's ``Translator`` loads it as it loads the fp32 one): the two
graphs quantized, the other files copied, ORT-format graphs (``ort/``) remade from the quantized graphs when the
input had them, and a new model.json: the same fields, every file's sha256 recomputed, and a ``quantization``
entry (method, preset, per-channel, quantized MatMul/Gemm nodes per graph, bytes before/after). Written atomically
(a temp dir beside ``--out``, renamed at the end); an existing ``--out`` needs ``--force``.

Methods
    ort-dynamic (default)  ``quantize_dynamic``: weights int8, symmetric, one scale per output channel, stored
                           quantized; activations quantized at run time, per tensor (uint8: ONNX Runtime's
                           DynamicQuantizeLinear has no other type). MatMul -> MatMulInteger + Cast + Mul by the
                           scales (fused into MatMulIntegerToFloat when the session loads). Needs no data.
    ort-static             ``quantize_static`` in QDQ format: weights as above; the activation range of every
                           quantized MatMul's input calibrated (MinMax) on real inputs: source sentences through
                           the encoder graph, greedy decoding steps through the decoder-step graph
                           (``CalibrationData``). Lines from ``--calibration FILE``, else the first
                           ``CALIBRATION_LINES`` of ``<data>/raw/train.<src>`` named by model.json. Lines that the
                           dictionary mostly does not know (> 50% of their pieces unk) are refused: a mismatch.
                           MatMul outputs stay fp32 (``OpTypesToExcludeOutputQuantization``): they feed the bias
                           Add, which is fp32, so a Q/DQ there would only add rounding.
    inc-tune               Intel Neural Compressor's accuracy-aware autotune (``compress.inc``): dynamic, static
                           (QDQ) and dynamic with the output projection in fp32 (not SmoothQuant: see compress/inc.py), tried in turn per
                           graph until BLEU on a held-out slice (default: the first lines of the valid split) is
                           within ``--max-bleu-drop`` of fp32. Calibration as ort-static. When no config meets it,
                           the best is written all the same and the command exits 3, unless ``--allow-loss``.

What is quantized, and what is not (on purpose)
    quantized   every MatMul whose B is a constant weight, i.e. every nn.Linear: attention q/k/v/out projections,
                the encoder's precomputed cross-attention k/v, conv-branch linear1/linear2, FFN fc1/fc2, GAU and
                Fastformer projections, the output projection (the largest). The export writes every Linear as
                MatMul (+ Add), on a 2-D input too (``export.exporter.gemms_as_matmuls``): ONNX Runtime has no
                dynamic integer Gemm (ort-static quantizes a Gemm too, in a graph exported otherwise).
    fp32        activation x activation MatMuls (attention scores, weighted sums; ``MatMulConstBOnly``): both
                sides would be quantized at run time, which costs about what it saves at these widths and is where
                int8 hurts attention most. Gather of the embedding tables: ONNX Runtime quantizes a Gather's table
                per tensor only (one scale for the whole vocabulary, bad for rare tokens) and a lookup has no
                arithmetic to speed up. Conv (lightweight/dynamic convolution): its kernels are computed
                (softmax-normalized) at run time, not constants. LayerNorm, Softmax, residual Adds: cheap, and the
                usual source of int8 accuracy loss.
    No ``quant_pre_process``: it first rewrites the graphs with ONNX Runtime's optimizer (fusions that would then
    decide what is quantized); ONNX Runtime applies those optimizations anyway when it loads the quantized graphs.

Presets (``PRESETS``): named for the hardware, as optimum's ``AutoQuantizationConfig.avx2()`` etc.; what each sets
and why is in ``Preset.why``. Weights are int8 symmetric (zero point 0) per output channel in every preset.

Measuring: ``sqnr_per_matmul(float_graph, quantized_graph, feeds)`` gives the SQNR (dB) of every quantized MatMul's
output against the same tensor of the fp32 graph (see there); ``CalibrationData.feeds(graph)`` makes real feeds.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Sequence

import numpy as np

from compress.calibration import (CALIBRATION_LINES, HELDOUT_LINES, CalibrationData, CalibrationReader,
                                  default_calibration_lines, heldout_lines)
from compress.errors import CriterionNotMet, QuantizeError
from export.model_dir import DESCRIPTION, GRAPHS, ModelDir, sha256, stage, write_description

logger = logging.getLogger(__name__)

METHODS = ("ort-dynamic", "ort-static", "inc-tune")
VALIDATION_LINES = 32  # valid-split sentences the compact layout is validated on
# op types that only a quantized graph has: a model dir holding any of them is refused
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                           "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "ConvInteger",
                           "QLinearConv", "QGemm", "QAttention"})


@dataclass(frozen=True)
class Preset:
    name: str
    reduce_range: bool  # weights in 7 bits ([-64, 64]) instead of [-127, 127]
    activation_type: str  # ort-static only ("uint8" | "int8"); ort-dynamic's activations are uint8 whatever this says
    activation_symmetric: bool  # ort-static only
    why: str


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("avx2", reduce_range=True, activation_type="uint8", activation_symmetric=False,
           why="x86 without VNNI multiplies u8 x s8 with VPMADDUBSW, which adds pairs into int16 and can saturate; "
               "7-bit weights (reduce_range) keep those sums in range"),
    Preset("avx512_vnni", reduce_range=False, activation_type="uint8", activation_symmetric=False,
           why="VNNI's VPDPBUSD accumulates u8 x s8 straight into int32, so full 8-bit weights cannot saturate; "
               "asymmetric uint8 activations are the operand that instruction takes"),
    Preset("arm64", reduce_range=False, activation_type="int8", activation_symmetric=True,
           why="NEON SDOT/SMMLA take s8 x s8 into int32 (no saturation, no reduce_range); ONNX Runtime's guide "
               "recommends symmetric int8 activations on ARM"),
)}


@dataclass(frozen=True)
class QuantizeConfig:
    method: str = "ort-dynamic"
    preset: str = "avx2"
    per_channel: bool = True

    def __post_init__(self):
        wrong = []  # every bad option at once
        if self.method not in METHODS:
            wrong.append(f"method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.preset not in PRESETS:
            wrong.append(f"preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        if wrong:
            raise QuantizeError("; ".join(wrong))


# ------------------------------------------------------------------------------------------------ graphs

class QuantizedNode(NamedTuple):
    name: str  # the fp32 graph's node name
    op_type: str  # the fp32 op: MatMul or Gemm
    output: str  # the tensor that carries its result in both graphs


def _producers(model) -> Dict[str, object]:
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model) -> Dict[str, List[object]]:
    found: Dict[str, List[object]] = {}
    for n in model.graph.node:
        for i in n.input:
            found.setdefault(i, []).append(n)
    return found


def constant_weight_matmuls(model) -> List[str]:
    """Names of the MatMul/Gemm nodes whose B (input 1) is a constant matrix (an initializer or a Constant, 2-D): what
    int8 applies to. A constant stack of matrices (routing's centroids [H, D, c]) stays fp32: ONNX Runtime's int8
    MatMul takes one matrix, and a nearest-centroid argmax should not move with rounding."""
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    ranks |= {n.output[0]: len(a.t.dims) for n in model.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and ranks.get(n.input[1]) == 2]


def quantized_matmuls(model) -> List[QuantizedNode]:
    """The MatMul/Gemm nodes of a quantized graph that compute in int8, by the fp32 graph's node and output names.

    Dynamic (IntegerOps): MatMulInteger -> Cast -> Mul, the Mul writing the fp32 MatMul's output tensor and the
    MatMulInteger named ``<MatMul name>_quant``. QDQ: a MatMul/Gemm whose B comes from a DequantizeLinear of an
    initializer (a quantized weight).
    """
    producers, consumers = _producers(model), _consumers(model)
    weights = {i.name for i in model.graph.initializer}
    found = []
    for n in model.graph.node:
        if n.op_type == "MatMulInteger":
            (cast,) = consumers[n.output[0]]
            (mul,) = consumers[cast.output[0]]
            found.append(QuantizedNode(n.name.removesuffix("_quant"), "MatMul", mul.output[0]))
        elif n.op_type in ("MatMul", "Gemm"):
            dequantize = producers.get(n.input[1])
            if dequantize is not None and dequantize.op_type == "DequantizeLinear" and dequantize.input[0] in weights:
                found.append(QuantizedNode(n.name, n.op_type, n.output[0]))
    return found


def _quantized_ops(model) -> List[str]:
    return sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})


def _session(model, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _with_outputs(model, names: Sequence[str]):
    """A copy of ``model`` whose graph outputs are exactly ``names`` (fp32 tensors of any shape)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return copy


def sqnr_per_matmul(float_graph: str | Path, quantized_graph: str | Path,
                    feeds: Iterable[Dict[str, np.ndarray]]) -> Dict[str, float]:
    """SQNR in dB of every quantized MatMul/Gemm's output vs the fp32 graph's, over all ``feeds``; by node name.

    SQNR = 10 log10(sum x^2 / sum (x - x_q)^2), x the fp32 graph's value of the tensor, x_q the quantized graph's,
    both sums over every element of every feed. How: in a copy of each graph the quantized nodes' output tensors
    (same names in both, see ``quantized_matmuls``) become the graph outputs. Each graph runs on its own, so a
    MatMul's number includes the error of the quantized layers before it: what the deployed model sees, not the
    error of that MatMul alone. Infinite where the outputs agree exactly.
    """
    import onnx

    float_model, quantized_model = onnx.load(str(float_graph)), onnx.load(str(quantized_graph))
    nodes = quantized_matmuls(quantized_model)
    if not nodes:
        raise QuantizeError(f"{quantized_graph}: no quantized MatMul/Gemm nodes")
    names = [n.output for n in nodes]
    float_session = _session(_with_outputs(float_model, names))
    quantized_session = _session(_with_outputs(quantized_model, names))
    signal, noise = np.zeros(len(names)), np.zeros(len(names))
    inputs = {i.name for i in float_session.get_inputs()}
    for feed in feeds:
        feed = {k: v for k, v in feed.items() if k in inputs}
        reference, quantized = float_session.run(names, feed), quantized_session.run(names, feed)
        for i, (x, y) in enumerate(zip(reference, quantized)):
            x = x.astype(np.float64)
            signal[i] += float(np.sum(x * x))
            noise[i] += float(np.sum((x - y.astype(np.float64)) ** 2))
    return {n.name: (math.inf if e == 0 else 10 * math.log10(s / e)) for n, s, e in zip(nodes, signal, noise)}


# ------------------------------------------------------------------------------------------------ quantize

class _NoPreprocessHint(logging.Filter):
    """quantize_* log on the root logger: a hint to run quant_pre_process (skipped on purpose, see the module doc)
    and a line per node left fp32 at DEBUG/INFO; while they run, the root logger keeps only other warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "pre-processing" not in record.getMessage()


def _check_not_quantized(source: ModelDir) -> None:
    import onnx

    entry = source.description.get("quantization")
    if entry is not None:
        raise QuantizeError(f"{source.path / DESCRIPTION} has a 'quantization' entry ({entry.get('method')}, from "
                            f"{entry.get('source', {}).get('dir', '?')}): already quantized; quantize the fp32 model "
                            f"dir that `lite export` wrote instead")
    for graph in GRAPHS:
        path = source.graph(graph)
        ops = _quantized_ops(onnx.load(str(path)))
        if ops:
            raise QuantizeError(f"{path} holds {', '.join(ops)}: already quantized; quantize the fp32 model dir that "
                                f"`lite export` wrote instead")


def quantize_graph(source: str | Path, target: str | Path, config: QuantizeConfig = QuantizeConfig(),
                   reader=None) -> None:
    """Quantize one graph file into ``target``: its constant-weight MatMul/Gemm nodes, named explicitly (QDQ's
    ``MatMulConstBOnly`` alone still quantizes activation x activation MatMuls). ``reader``: ort-static's
    calibration feeds (an object with ``get_next()``, e.g. ``CalibrationReader(CalibrationData(...), graph)``)."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    preset = PRESETS[config.preset]
    nodes = constant_weight_matmuls(onnx.load(str(source)))
    root = logging.getLogger()
    hint = _NoPreprocessHint()
    root.addFilter(hint)
    try:
        if config.method == "ort-dynamic":
            quantize_dynamic(source, target, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                             per_channel=config.per_channel, reduce_range=preset.reduce_range,
                             weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True})
        else:
            activation = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[preset.activation_type]
            if reader is None:
                raise QuantizeError("ort-static needs calibration data (a reader of real feeds)")
            quantize_static(source, target, reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                            per_channel=config.per_channel,
                            reduce_range=preset.reduce_range, activation_type=activation,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True,
                                           "ActivationSymmetric": preset.activation_symmetric,
                                           "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                                           "CalibMaxIntermediateOutputs": 64})  # bounds calibration memory
    finally:
        root.removeFilter(hint)
    model = onnx.load(str(target))
    del model.graph.value_info[:]  # shapes the quantizer inferred: optional, ONNX Runtime infers them again on load
    onnx.save(model, str(target))


def _summary(config: QuantizeConfig, source: ModelDir, staging: Path, counts: dict, calibration: dict | None) -> dict:
    import onnxruntime

    preset = PRESETS[config.preset]
    from compress.compact import WEIGHTS
    from export.packed_weights import PACKED

    size = {g: {"before": source.graph(g).stat().st_size, "after": (staging / f"{g}.onnx").stat().st_size}
            for g in GRAPHS}
    for weights in (WEIGHTS, PACKED):  # the compact layout: both graphs' weights (packed when sparse)
        if (staging / weights).is_file():
            size[weights] = {"before": 0, "after": (staging / weights).stat().st_size}
    size["total"] = {k: sum(v[k] for v in size.values()) for k in ("before", "after")}
    activations = ("uint8 asymmetric, per tensor, at run time" if config.method == "ort-dynamic" else
                   f"{preset.activation_type} {'symmetric' if preset.activation_symmetric else 'asymmetric'}, "
                   f"per tensor, calibrated (MinMax, QDQ)")
    return {"method": config.method, "preset": config.preset, "per_channel": config.per_channel,
            "weights": "int8 symmetric" + (", 7-bit (reduce_range)" if preset.reduce_range else ""),
            "activations": activations, "quantized": counts, "bytes": size,
            **({"calibration": calibration} if calibration else {}),
            "source": {"dir": str(source.path.resolve()), "model_jsonsha256": sha256(source.path / DESCRIPTION)},
            "onnxruntime": onnxruntime.__version__}


def _counts(float_graph: Path, graph_file: Path) -> dict:
    """Quantized MatMul/Gemm nodes of a graph, and the constant-weight ones of its fp32 source."""
    import onnx

    nodes = quantized_matmuls(onnx.load(str(graph_file)))
    counts = {op: sum(n.op_type == op for n in nodes) for op in ("MatMul", "Gemm")}
    counts["constant_weight_matmuls_fp32"] = len(constant_weight_matmuls(onnx.load(str(float_graph))))
    if len(nodes) != counts["constant_weight_matmuls_fp32"]:
        logger.warning(f"{graph_file.stem}: {len(nodes)} of {counts['constant_weight_matmuls_fp32']} "
                       f"constant-weight MatMul/Gemm nodes quantized")
    return counts


def _compact(source: ModelDir, staging: Path, preset: Preset) -> dict:
    """Rewrite the quantized graphs of ``staging`` in the compact layout (``compress.compact``); returns model.json's
    ``compact`` entry, with the SQNR against the fp32 graphs of both layouts on the first ``VALIDATION_LINES`` of
    the valid split (skipped, saying why, when the model's data is not on this machine)."""
    import tempfile

    from compress.compact import WEIGHTS, compact_graphs, save_with_shared_weights, validate

    with tempfile.TemporaryDirectory(dir=staging) as tmp:  # gone before the files are listed
        plain = {g: Path(tmp) / f"{g}.onnx" for g in GRAPHS}
        for g in GRAPHS:
            (staging / f"{g}.onnx").rename(plain[g])
        stored = save_with_shared_weights(compact_graphs(plain, preset.reduce_range), staging)
        try:
            lines, _ = heldout_lines(source.description, VALIDATION_LINES)
            data = CalibrationData(source.path, lines, source="valid split")
            feeds = {g: list(data.feeds(g)) for g in GRAPHS}
            sqnr = validate({g: source.graph(g) for g in GRAPHS},
                            {"compact": {g: staging / f"{g}.onnx" for g in GRAPHS}, "no_compact": plain}, feeds)
            validation = {"lines": data.lines, "sqnr_db": sqnr}
        except QuantizeError as e:
            validation = {"skipped": str(e)}
    return {"weights": WEIGHTS, **stored, "embeddings": "int8 symmetric, one scale per row (token)",
            "validation": validation}


def quantize(model_dir: str | Path, out_dir: str | Path, method: str = "ort-dynamic", preset: str = "avx2",
             calibration_lines: Sequence[str] | None = None, force: bool = False, max_bleu_drop: float = 0.3,
             heldout: tuple[Sequence[str], Sequence[str]] | None = None, allow_loss: bool = False,
             eval_lines: int = HELDOUT_LINES, compact: bool = True) -> Path:
    """int8 of a model dir (``lite export``) -> a new model dir at ``out_dir``; returns ``out_dir``.

    ``calibration_lines``: source sentences for ``ort-static`` and ``inc-tune`` (default: the first
    ``CALIBRATION_LINES`` of the training text model.json names). ``inc-tune`` only: ``heldout`` (sources,
    references) scored with BLEU (default: the first ``eval_lines`` of ``heldout_lines``), ``max_bleu_drop``, and
    ``allow_loss``: without it a tuning that meets no criterion raises ``CriterionNotMet`` after writing the best
    model dir. An existing ``out_dir`` must be a model dir and needs ``force`` (``lite.files.OutputError``).
    """
    import onnx

    from compress.compact import pack_weights
    from export.ort_format import to_ort

    config = QuantizeConfig(method, preset)
    out = Path(out_dir)
    source = ModelDir.open(model_dir)  # every file checked against its sha256
    description = source.description
    _check_not_quantized(source)
    if out.resolve() == source.path.resolve():
        raise QuantizeError(f"--out {out} is the model dir itself; choose another dir")
    tuned = None
    with stage(out, force) as staging:
        if method == "inc-tune":
            sources, references = heldout if heldout is not None else heldout_lines(description, eval_lines)
            if len(sources) != len(references) or not sources:
                raise QuantizeError(f"held-out text: {len(sources)} source and {len(references)} reference lines; "
                                    f"give the same number, at least one")
        calibration, calibration_entry = None, None
        if config.method in ("ort-static", "inc-tune"):
            text = "calibration lines"
            if calibration_lines is None:
                calibration_lines, path = default_calibration_lines(description)
                text = str(path)
            calibration = CalibrationData(source.path, calibration_lines, source=text)
            calibration_entry = {"source": text, "lines": calibration.lines,
                                 "unk_fraction": round(calibration.unk_fraction, 4), "method": "MinMax"}
        if config.method == "inc-tune":
            from compress.inc import tune

            nodes = {g: constant_weight_matmuls(onnx.load(str(source.graph(g)))) for g in GRAPHS}
            tuned = tune(source.path, staging, nodes, PRESETS[config.preset],
                         lambda g: CalibrationReader(calibration, g), list(sources), list(references), max_bleu_drop)
        counts = {}
        for graph in GRAPHS:
            target = staging / f"{graph}.onnx"
            if tuned is None:
                reader = CalibrationReader(calibration, graph) if calibration else None
                quantize_graph(source.graph(graph), target, config, reader)
            onnx.checker.check_model(str(target))
            counts[graph] = _counts(source.graph(graph), target)
        # inc-tune keeps the graphs its BLEU criterion measured (compacting them would change the embeddings)
        compact_entry = _compact(source, staging, PRESETS[config.preset]) if compact and tuned is None else None
        source.copy_non_graph_files(staging)
        if source.has_ort:
            to_ort(staging)  # the same conversion as `lite export --ort`
        packed = pack_weights(staging) if compact_entry is not None else None  # after to_ort: it reads WEIGHTS
        if packed is not None:
            compact_entry["packed"] = {"file": packed["file"], "bytes": packed["bytes"],
                                       "packed_bytes": (staging / packed["file"]).stat().st_size,
                                       "bitmask_tensors": sum(s[2] == "bitmask" for s in packed["segments"])}
        graph = onnx.load(str(staging / "encoder.onnx"), load_external_data=False)
        opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
        summary = _summary(config, source, staging, counts, calibration_entry)
        if compact_entry is not None:
            summary["compact"] = compact_entry
        if tuned is not None:
            summary["tuning"] = {"max_bleu_drop": max_bleu_drop, "heldout_lines": len(sources), **tuned.as_dict()}
        write_description(staging, {**description, "opset": opset, "quantization": summary,
                                    **({"packed": packed} if packed else {})})
    size = summary["bytes"]["total"]
    logger.info(f"quantized {source.path} to {out} ({config.method}, {config.preset}): {size['before']:,} -> "
                f"{size['after']:,} bytes")
    if tuned is not None and not tuned.met and not allow_loss:
        raise CriterionNotMet(f"no config kept BLEU within {max_bleu_drop} of fp32 ({tuned.fp32_bleu}): the best, "
                              f"BLEU {tuned.bleu}, is written to {out}; pass --allow-loss to accept it")
    return out


__all__ = ["quantize", "quantize_graph", "sqnr_per_matmul", "quantized_matmuls", "constant_weight_matmuls",
           "QuantizeConfig", "QuantizeError", "CriterionNotMet", "Preset", "PRESETS", "METHODS", "CALIBRATION_LINES",
           "HELDOUT_LINES"]
