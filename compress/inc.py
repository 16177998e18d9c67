"""Accuracy-aware int8 with Intel Neural Compressor: ``lite compress quantize --method inc-tune``.

    lite compress quantize runs/export/lsra --out runs/export/lsra-inc --method inc-tune --max-bleu-drop 0.3

Intel Neural Compressor's ONNX Runtime edition (``onnx-neural-compressor``) tunes one graph file at a time: its
``autotune`` quantizes the graph with each config of a set in turn, scores each with an evaluation function and
stops at the first whose score is within the tolerable loss of the fp32 baseline. Ours scores a whole model dir:
the candidate graph beside the other graph, BLEU (sacrebleu) of beam search on a held-out slice (default: the
first ``compress.calibration.HELDOUT_LINES`` lines of the valid split of the data model.json names). The encoder is
tuned first (with the fp32 decoder step), then the decoder step beside the chosen encoder. The criterion is
absolute: BLEU of the final model >= fp32 BLEU - ``max_bleu_drop``; each stage's relative ``tolerable_loss`` is
derived from it, so the decoder step gets whatever the encoder left of the budget.

Configs tried, per graph, in this order (fastest first; all on the constant-weight MatMuls only, int8 symmetric
weights per output channel, as ``compress.quantize``):
    dynamic             activations quantized at run time (as ort-dynamic)
    static              QDQ, activation ranges calibrated (MinMax) on greedy decoding of training sentences
    dynamic-last-fp32   dynamic, the graph's last MatMul (the decoder's output projection) kept fp32
Not SmoothQuant: INC 1.0's tuning tells configs apart by their per-node mapping, which SmoothQuant does not change,
so it skips it as already tried after static. Each trial is named by what its graph holds (``_config_of``), not by
its place in the order, so a config INC skips cannot shift the names.

When no config meets the criterion the best one (highest BLEU) of each graph is kept, and ``TuneResult.met`` says
so. INC's own answer in that case is the last config tried, and it ends the process (``exit(0)``): both are
replaced here (``SystemExit`` is caught, every trial's graph is kept by the evaluation function).
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from eval.bleu import corpus_bleu
from export.model_dir import GRAPHS, ModelDir, write_description
from export.runtime import Translator
from export.search import SearchOptions

logger = logging.getLogger(__name__)

CONFIGS = ("dynamic", "static", "dynamic-last-fp32")


@dataclass
class Trial:
    config: str
    bleu: float


@dataclass
class GraphTuning:
    graph: str
    baseline: float  # BLEU with this graph fp32 (and the graphs tuned before it quantized)
    tolerable_loss: float  # INC's relative criterion for this graph, from the absolute one
    trials: List[Trial]
    chosen: str
    bleu: float  # with the chosen config


@dataclass
class TuneResult:
    fp32_bleu: float
    threshold: float  # the criterion: final BLEU >= this
    graphs: List[GraphTuning]
    bleu: float  # of the chosen graphs together
    met: bool

    def as_dict(self) -> dict:
        return {"fp32_bleu": self.fp32_bleu, "threshold": self.threshold, "bleu": self.bleu, "met": self.met,
                "graphs": {g.graph: {"baseline": g.baseline, "tolerable_loss": round(g.tolerable_loss, 5),
                                     "chosen": g.chosen, "bleu": g.bleu, "trials": [asdict(t) for t in g.trials]}
                           for g in self.graphs}}


def _configs(nodes: Sequence[str], preset) -> Dict[str, object]:
    """The config set of one graph, by name (``CONFIGS``); ``nodes``: its constant-weight MatMuls; ``preset``: a
    ``compress.quantize.Preset`` (weight range, static activation type and symmetry)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnx_neural_compressor.quantization import config

    common = dict(op_types_to_quantize=["MatMul"], nodes_to_quantize=list(nodes), per_channel=True,
                  reduce_range=preset.reduce_range, weight_type=QuantType.QInt8,
                  execution_provider="CPUExecutionProvider")
    weights = {"WeightSymmetric": True}
    activation = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[preset.activation_type]
    static = dict(common, quant_format=QuantFormat.QDQ, calibrate_method=CalibrationMethod.MinMax,
                  activation_type=activation)
    static_options = {**weights, "ActivationSymmetric": preset.activation_symmetric}
    return {
        "dynamic": config.DynamicQuantConfig(**common, extra_options=weights),
        "static": config.StaticQuantConfig(**static, extra_options=static_options),
        "dynamic-last-fp32": config.DynamicQuantConfig(**common, extra_options=weights, quant_last_matmul=False),
    }


def _config_of(model, nodes: Sequence[str]) -> str:
    """Which of ``CONFIGS`` made a quantized graph: dynamic graphs hold MatMulInteger (one per quantized MatMul),
    static ones QuantizeLinear/DequantizeLinear; "dynamic-last-fp32" leaves the last of ``nodes`` unquantized."""
    ops = [n.op_type for n in model.graph.node]
    if "MatMulInteger" in ops:
        count = ops.count("MatMulInteger")
        return {len(nodes): "dynamic", len(nodes) - 1: "dynamic-last-fp32"}.get(count, f"dynamic, {count} MatMuls")
    if "DequantizeLinear" in ops:
        return "static"
    raise RuntimeError("Neural Compressor returned a graph with no quantized node")


class _ModelDirScorer:
    """INC's evaluation function: BLEU of a model dir made of the candidate graph and the current other graph.

    Keeps every trial's graph (single file) and never raises into INC, which would end the process: an error is
    kept and re-raised by ``tune`` after ``autotune`` returns.
    """

    def __init__(self, model_dir: Path, work: Path, sources: List[str], references: List[str],
                 options: SearchOptions, nodes: Dict[str, List[str]]):
        self.work = work
        self.sources, self.references, self.options = sources, references, options
        self.source = ModelDir.open(model_dir)
        self.current = {g: self.source.graph(g) for g in GRAPHS}  # the graphs chosen so far
        self.graph, self.error = GRAPHS[0], None
        self.baseline = math.nan  # BLEU of ``current``, known before INC scores it again as its baseline
        self.nodes = nodes
        self.kept: List[tuple] = []  # (graph file, config, BLEU) of each call: INC's fp32 baseline first

    def bleu(self, graphs: Dict[str, Path]) -> float:
        """BLEU (2 decimals) of the model dir made of these graphs and the source dir's other files."""
        with tempfile.TemporaryDirectory(prefix=".trial.", dir=self.work) as trial:
            trial = Path(trial)
            self.source.copy_non_graph_files(trial)
            for g, path in graphs.items():
                shutil.copy2(path, trial / f"{g}.onnx")
            write_description(trial, {k: v for k, v in self.source.description.items() if k != "files"})
            hypotheses = Translator(trial, self.options).translate(self.sources)
        return round(corpus_bleu(hypotheses, self.references), 2)

    def __call__(self, model_path: str) -> float:
        import onnx

        if self.error is not None:
            return -math.inf
        if not self.kept:  # INC's first call: its baseline, the current graph unchanged (ORT_DISABLE_ALL)
            self.kept.append((self.current[self.graph], "fp32", self.baseline))
            return self.baseline
        try:
            kept = self.work / f"{self.graph}.{len(self.kept)}.onnx"  # a single file, INC's external data folded in
            model = onnx.load(model_path)
            onnx.save(model, str(kept))
            config = _config_of(model, self.nodes[self.graph])
            score = self.bleu({**self.current, self.graph: kept})
            self.kept.append((kept, config, score))
            logger.info(f"inc-tune {self.graph} {config}: BLEU {score}")
            return score
        except Exception as e:  # noqa: BLE001 -- INC exits the process on an exception from here
            self.error = e
            return -math.inf


def tune(model_dir: str | Path, out_dir: str | Path, nodes: Dict[str, List[str]], preset,
         reader_for: Callable[[str], object], sources: List[str], references: List[str],
         max_bleu_drop: float = 0.3, options: SearchOptions = SearchOptions()) -> TuneResult:
    """Tune both graphs of ``model_dir``; write the chosen ``<graph>.onnx`` files into ``out_dir``.

    ``nodes``: each graph's constant-weight MatMul names; ``preset``: a ``compress.quantize.Preset``;
    ``reader_for(graph)``: the graph's calibration data reader.
    """
    from onnx_neural_compressor.quantization import tuning
    import onnxruntime as ort

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    logging.getLogger("onnx_neural_compressor").setLevel(logging.WARNING)  # a line per config and node otherwise
    with tempfile.TemporaryDirectory(prefix=".inc.", dir=out_dir) as work:
        scorer = _ModelDirScorer(model_dir, Path(work), sources, references, options, nodes)
        fp32 = scorer.bleu(scorer.current)
        threshold = round(fp32 - max_bleu_drop, 2)
        results = []
        for graph in GRAPHS:
            configs = _configs(nodes[graph], preset)
            baseline = results[-1].bleu if results else fp32  # the model as the graphs before left it
            loss = 1.0 if baseline <= 0 or threshold <= 0 else 1 - threshold / baseline
            scorer.graph, scorer.kept, scorer.baseline = graph, [], baseline
            try:  # INC ends the process when no config meets the criterion
                tuning.autotune(str(scorer.current[graph]),
                                tuning.TuningConfig(config_set=list(configs.values()), tolerable_loss=loss,
                                                    max_trials=len(configs)),
                                eval_fn=scorer, calibration_data_reader=reader_for(graph),
                                optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            except SystemExit:
                pass
            if scorer.error is not None:
                raise scorer.error
            _, *tried = scorer.kept  # the first call scores INC's fp32 baseline
            if not tried:
                raise RuntimeError(f"Neural Compressor tried no config on {graph}")
            trials = [Trial(config, bleu) for _, config, bleu in tried]
            met = [i for i, t in enumerate(trials) if t.bleu >= threshold]
            chosen = met[0] if met else max(range(len(trials)), key=lambda i: trials[i].bleu)  # INC: the first met
            scorer.current[graph] = tried[chosen][0]
            results.append(GraphTuning(graph, baseline, loss, trials, trials[chosen].config, trials[chosen].bleu))
        for graph in GRAPHS:
            shutil.copy2(scorer.current[graph], out_dir / f"{graph}.onnx")
    final = results[-1].bleu  # the last graph's chosen trial ran beside every graph chosen before it
    return TuneResult(fp32, threshold, results, final, final >= threshold)
