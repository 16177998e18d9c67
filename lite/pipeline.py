"""``lite pipeline CONFIG``: parallel text -> trained, compressed, exported, int8 models -> bench -> report, in one go.

    data -> [shortlist] -> <model>/train -> [<model>/prune -> <model>/finetune] -> <model>/export
         -> <model>/quantize -> <model>/eval -> bench -> summary -> report

Every stage is skipped when its inputs are unchanged: a stage's key is the sha256 of its options and of the
content of the artifacts it reads, recorded in ``<run>/manifest.json`` with the hashes of what it wrote, the
equivalent command, its wall and CPU time, and the package versions. A stage interrupted or failed is run again
on the next run (training resumes from its last checkpoint); the manifest says which failed and why. One
pipeline at a time per run dir (a lock). The configs under ``configs/pipelines/`` say what each key means.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import resource
import shlex
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace, fields
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from lite.errors import LiteError
from lite.files import write_json
from lite.machine import describe

logger = logging.getLogger(__name__)

PACKAGES = ("lite-mt", "torch", "fairseq-fixed", "onnxruntime", "onnx", "ctranslate2", "sacrebleu", "torch-pruning",
            "sentencepiece", "numpy")


class PipelineError(LiteError, ValueError):
    """A pipeline config or run dir that cannot be used; the message names the key or file."""


# ---------------------------------------------------------------------------------------------- config

def _typed(cls, values: dict, where: str):
    """``cls(**values)`` with unknown keys named, and the valid ones listed."""
    if not isinstance(values, dict):
        raise PipelineError(f"{where}: expected a mapping, got {type(values).__name__}")
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return cls(**values)


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # "embedded", a dir of parallel text, or a corpus for `lite data download`
    src: str = "de"
    tgt: str = "en"
    vocab_size: int = 8000
    test_split: str = "test"


@dataclass(frozen=True)
class ModelConfig:
    config: str  # configs/models/<family>/<preset>.yaml
    overrides: dict = field(default_factory=dict)  # any key of that config
    max_minutes: float | None = None  # wall time of training
    max_cpu_minutes: float | None = None  # CPU time of training (equal-compute comparisons)
    prune: dict | None = None  # {budget: "1M", finetune_overrides: {...}, finetune_cpu_minutes: ...}
    quantize: dict = field(default_factory=lambda: {"method": "ort-dynamic", "preset": "avx2", "compact": True})
    gpu: str | None = None  # the command that trains it on GPUs (documentation; the CPU run records how far it got)
    eval_at_updates: tuple = ()  # also the BLEU of its checkpoints at these update counts (checkpoint_E_N.pt): ranks
    # runs whose CPU time bought different counts (fairseq's inverse-sqrt learning rate follows the count alone)


@dataclass(frozen=True)
class BenchSettings:
    sentences: int = 300
    threads: tuple = (1,)
    repeat: int = 1
    batch: int = 32
    ct2: bool = True  # CTranslate2 int8 on every plain-Transformer model of the run
    shortlist: dict | None = None  # {per_source, frequent}: a vocabulary map, every onnx and ct2 target again with it
    ort_search: bool = False  # every plain-Transformer onnx target again, searched by ONNX Runtime's BeamSearch op


@dataclass(frozen=True)
class ShortlistSettings:  # lite data shortlist's options
    per_source: int = 20
    frequent: int = 100


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    data: DataConfig
    models: dict  # name -> ModelConfig
    bench: BenchSettings
    path: Path


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: cannot read pipeline config: {e}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: a pipeline config is a mapping")
    unknown = [k for k in raw if k not in ("name", "data", "models", "bench")]
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: name, data, models, bench")
    if not raw.get("name") or not raw.get("models"):
        raise PipelineError(f"{path}: `name` and `models` are required")
    models = {name: _typed(ModelConfig, m, f"{path}: models.{name}") for name, m in raw["models"].items()}
    for name, m in models.items():
        if m.prune is not None and "budget" not in m.prune:
            raise PipelineError(f"{path}: models.{name}.prune needs a budget (MACs, e.g. 1M)")
        _check_eval_at_updates(m, f"{path}: models.{name}")
    models = {name: replace(m, eval_at_updates=tuple(m.eval_at_updates)) for name, m in models.items()}
    bench = _typed(BenchSettings, raw.get("bench") or {}, f"{path}: bench")
    if bench.shortlist is not None:
        _typed(ShortlistSettings, bench.shortlist, f"{path}: bench.shortlist")
    return PipelineConfig(raw["name"], _typed(DataConfig, raw.get("data") or {}, f"{path}: data"), models,
                          BenchSettings(**{**bench.__dict__, "threads": tuple(bench.threads)}), path)


def _check_eval_at_updates(m: ModelConfig, where: str) -> None:
    """Every count of ``eval_at_updates`` must be one that training keeps a checkpoint at."""
    if not m.eval_at_updates:
        return
    counts = m.eval_at_updates
    if not (isinstance(counts, (list, tuple)) and all(isinstance(n, int) and n > 0 for n in counts)):
        raise PipelineError(f"{where}.eval_at_updates: a list of update counts (e.g. [2000]), got {counts!r}")
    interval = m.overrides.get("save_interval_updates") or _model_config(m.config).get("save_interval_updates")
    off = [n for n in counts if not interval or n % interval]
    if off:
        raise PipelineError(f"{where}.eval_at_updates: no checkpoint is kept at {', '.join(map(str, off))} updates "
                            f"(save_interval_updates is {interval or 'not set'}; set it to a divisor of each count)")


def select_models(config: PipelineConfig, names: list[str]) -> PipelineConfig:
    """The same run restricted to some of its models (their stages, then bench, summary and report over them)."""
    unknown = [n for n in names if n not in config.models]
    if unknown:
        raise PipelineError(f"{config.path}: no model {', '.join(unknown)}; its models: {', '.join(config.models)}")
    return replace(config, models={n: config.models[n] for n in names})


# ---------------------------------------------------------------------------------------------- manifest

def content_hash(path: Path) -> str:
    """sha256 of a file, or of a dir's files (relative names and contents), ignoring dot files."""
    from export.model_dir import sha256

    if path.is_file():
        return sha256(path)
    digest = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        digest.update(f"{p.relative_to(path).as_posix()}\0{sha256(p)}\0".encode())
    return digest.hexdigest()


def _versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class Stage:
    name: str
    command: str  # the equivalent lite command
    options: dict  # what shapes the output besides the inputs
    inputs: list[Path]  # artifacts read
    outputs: list[Path]  # artifacts written (files or dirs)
    run: Callable[[], Any]


class Manifest:
    """``<run>/manifest.json``: the record of every stage, written after each one."""

    def __init__(self, run_dir: Path, config: PipelineConfig):
        self.path = run_dir / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}
        self.data.update(name=config.name, config=str(config.path), config_sha256=content_hash(config.path),
                         versions=_versions())

    def key(self, stage: Stage) -> str:
        blob = json.dumps({"options": stage.options, "inputs": {str(p): content_hash(p) for p in stage.inputs}},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def up_to_date(self, stage: Stage, key: str) -> bool:
        entry = self.data["stages"].get(stage.name)
        return (entry is not None and entry["status"] == "done" and entry["key"] == key
                and all(p.exists() and content_hash(p) == entry["outputs"].get(str(p)) for p in stage.outputs))

    def record(self, stage: Stage, **entry) -> None:
        self.data["stages"][stage.name] = {"command": stage.command, **entry}
        write_json(self.path, self.data)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def _lock(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"{run_dir} is in use by another `lite pipeline` (lock {run_dir / '.lock'}); "
                                f"wait for it or choose another run dir") from None
        yield


def run_stages(stages: list[Stage], manifest: Manifest, progress=None) -> list[str]:
    """Run every stage that is not up to date, in order; returns the names of those that ran. A failing stage is
    recorded (status, error) and its error raised."""
    ran = []
    for stage in stages:
        key = manifest.key(stage)
        if manifest.up_to_date(stage, key):
            if progress:
                progress(stage, "up to date")
            continue
        if progress:
            progress(stage, "running")
        manifest.record(stage, status="running", key=key, outputs={})
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            stage.run()
        except BaseException as e:
            manifest.record(stage, status="failed", key=key, outputs={},
                            error=f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__,
                            traceback=traceback.format_exc(limit=3))
            raise
        manifest.record(stage, status="done", key=key, outputs={str(p): content_hash(p) for p in stage.outputs},
                        seconds=round(time.perf_counter() - wall, 1), cpu_seconds=round(_cpu_seconds() - cpu, 1),
                        machine=describe(), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        ran.append(stage.name)
        if progress:
            progress(stage, "done")
    return ran


# ---------------------------------------------------------------------------------------------- the stages

def _cmd(*parts) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def _overrides(values: dict) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def _family(arch: str) -> str:
    families = ("flash_quad", "flash", "fastformer", "linear", "performer", "local", "synthesizer_dense",
                "synthesizer_random", "linformer", "memory_compressed", "strided", "longformer", "bigbird", "isab",
                "routing", "sinkhorn", "poolingformer", "reformer", "lsra", "transformer")
    return next((f for f in families if arch.startswith(f)), arch)


def _data_stage(config: PipelineConfig, run_dir: Path) -> Stage:
    from lite.corpus import write_default_corpus
    from lite.data import prepare
    from lite.download import download

    d, data_dir = config.data, run_dir / "data"
    source = Path(d.source)

    def run():
        text = source
        if d.source == "embedded":
            text = write_default_corpus(run_dir / "text")
        elif not source.is_dir():
            text = download(d.source, run_dir / "text")
        prepare(text, data_dir, d.src, d.tgt, d.vocab_size, force=True)

    origin = "embedded" if d.source == "embedded" else source if source.is_dir() else f"download {d.source}"
    return Stage("data", _cmd("lite", "data", "prepare", "--from", origin, "--out", data_dir, "--vocab-size",
                              d.vocab_size), d.__dict__, [source] if source.is_dir() else [], [data_dir], run)


def _train_stage(name: str, model_config: str, overrides: dict, save_dir: Path, inputs: list[Path],
                 max_minutes=None, max_cpu_minutes=None, finetune_from: Path | None = None) -> Stage:
    from lite.train import load_config, train

    def run():
        config = load_config(model_config, _overrides(overrides))
        code = train(config, max_minutes, str(finetune_from) if finetune_from else None, max_cpu_minutes)
        if code != 0:
            raise PipelineError(f"fairseq-train exited with code {code} (its log is above)")

    command = _cmd("lite", "train", model_config, *_overrides(overrides),
                   *(["--finetune-from", finetune_from] if finetune_from else []),
                   *(["--max-minutes", max_minutes] if max_minutes else []),
                   *(["--max-cpu-minutes", max_cpu_minutes] if max_cpu_minutes else []))
    return Stage(name, command, {"overrides": overrides, "max_minutes": max_minutes,
                                 "max_cpu_minutes": max_cpu_minutes}, [Path(model_config), *inputs],
                 [save_dir / "checkpoint_best.pt"], run)


def _measure_stages(base: Path, checkpoints: dict[str, Path], int8: Path, source_of_int8: str, split: str,
                    eval_at_updates: tuple = ()) -> dict:
    """Per compression stage: BLEU (torch for checkpoints, ONNX Runtime for the int8 dir), MACs, params, bytes; for
    fp32 also ``bleu_at_updates`` {count: BLEU of the training's checkpoint there} (a count it did not reach left
    out, with a warning)."""
    from eval.evaluate import evaluate
    from eval.macs import count_params, paper_macs
    from lite.checkpoint import load_model

    stages = {}
    for stage, checkpoint in checkpoints.items():
        model, _ = load_model(checkpoint)
        params, params_no_embed = count_params(model)
        export_dir = base / "onnx" / ("fp32" if stage == "fp32" else "pruned")
        stages[stage] = {"bleu": evaluate(checkpoint, split, out_dir=base / "eval" / stage)["bleu"],
                         "macs": paper_macs(model).total, "params": params, "params_no_embed": params_no_embed,
                         "bytes": _bytes(export_dir),
                         "arch": model.args.arch, "family": _family(model.args.arch),
                         "budget": next((b for b in ("100m", "500m") if model.args.arch.endswith(b)), None)}
    stages["int8"] = {**stages[source_of_int8], "bytes": _bytes(int8),
                      "bleu": evaluate(int8, split, backend="onnx", out_dir=base / "eval" / "int8")["bleu"]}
    if eval_at_updates:
        stages["fp32"]["bleu_at_updates"] = _bleu_at_updates(checkpoints["fp32"].parent, eval_at_updates, split,
                                                             base / "eval")
    return stages


def _bleu_at_updates(save_dir: Path, counts: tuple, split: str, eval_dir: Path) -> dict[str, float]:
    """{count: BLEU} of the checkpoints fairseq kept at those update counts (``checkpoint_E_N.pt``)."""
    from eval.evaluate import evaluate

    found = {}
    for n in counts:
        kept = sorted(save_dir.glob(f"checkpoint_*_{n}.pt"))
        if not kept:
            logger.warning(f"{save_dir}: no checkpoint at {n} updates (training ended before, or it fell at an "
                           "epoch's end, where fairseq keeps none): its BLEU left out")
            continue
        found[str(n)] = evaluate(kept[0], split, out_dir=eval_dir / f"fp32_at_{n}")["bleu"]
    return found


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _model_stages(config: PipelineConfig, run_dir: Path, name: str, m: ModelConfig) -> list[Stage]:
    from compress.prune import PruneConfig, prune_checkpoint
    from compress.quantize import quantize
    from export.exporter import export
    from lite.cli.types import budget as parse_budget

    data_dir, base = run_dir / "data", run_dir / name
    overrides = {**m.overrides, "data": str(data_dir), "save_dir": str(base / "checkpoints")}
    trained = base / "checkpoints" / "checkpoint_best.pt"
    stages = [_train_stage(f"{name}/train", m.config, overrides, base / "checkpoints", [data_dir], m.max_minutes,
                           m.max_cpu_minutes)]
    checkpoints = {"fp32": trained}
    exports = {"fp32": (trained, base / "onnx" / "fp32")}
    if m.prune:
        pruned, finetuned = base / "pruned" / "checkpoint_pruned.pt", base / "finetuned" / "checkpoint_best.pt"
        budget = parse_budget(str(m.prune["budget"]))
        stages.append(Stage(f"{name}/prune", _cmd("lite", "compress", "prune", trained, "--budget", m.prune["budget"],
                                                  "--out", base / "pruned"),
                            {"budget": budget}, [trained], [pruned],
                            lambda: prune_checkpoint(trained, base / "pruned", PruneConfig(budget), force=True)))
        tune = {**overrides, **m.prune.get("finetune_overrides", {}), "save_dir": str(base / "finetuned")}
        stages.append(_train_stage(f"{name}/finetune", m.config, tune, base / "finetuned", [data_dir, pruned],
                                   max_cpu_minutes=m.prune.get("finetune_cpu_minutes"), finetune_from=pruned))
        checkpoints.update(pruned=pruned, finetuned=finetuned)
        exports["pruned"] = (finetuned, base / "onnx" / "pruned")
    for stage, (checkpoint, out) in exports.items():
        stages.append(Stage(f"{name}/export-{stage}", _cmd("lite", "export", checkpoint, "--out", out, "--force"),
                            {}, [checkpoint], [out],
                            lambda checkpoint=checkpoint, out=out: export(checkpoint, out, force=True)))
    last = exports["pruned" if m.prune else "fp32"][1]
    int8 = base / "onnx" / "int8"
    q = {"method": "ort-dynamic", "preset": "avx2", "compact": True, **m.quantize}
    stages.append(Stage(f"{name}/quantize", _cmd("lite", "compress", "quantize", last, "--out", int8, "--method",
                                                 q["method"], "--preset", q["preset"], "--force",
                                                 *([] if q["compact"] else ["--no-compact"])),
                        q, [last], [int8],
                        lambda: quantize(last, int8, q["method"], q["preset"], force=True, compact=q["compact"])))
    measured = base / "stages.json"
    split = config.data.test_split
    at_updates = [f"lite eval --checkpoint {shlex.quote(str(base / 'checkpoints'))}/checkpoint_*_{n}.pt --split "
                  f"{shlex.quote(split)}" for n in m.eval_at_updates]  # the glob unquoted: E is the epoch
    command = "; ".join([_cmd("lite", "eval", "--checkpoint", c, "--split", split) for c in checkpoints.values()]
                        + at_updates + [_cmd("lite", "eval", "--backend", "onnx", "--model", int8, "--split", split),
                           _cmd("lite", "macs", "--checkpoint", trained)])
    options = {"split": split, **({"eval_at_updates": list(m.eval_at_updates)} if m.eval_at_updates else {})}
    stages.append(Stage(f"{name}/eval", command, options, [*checkpoints.values(), int8], [measured],
                        lambda: write_json(measured, _measure_stages(
                            base, checkpoints, int8, "finetuned" if m.prune else "fp32", split, m.eval_at_updates))))
    return stages


def _bench_targets(config: PipelineConfig, run_dir: Path) -> list:
    from eval.bench import Target

    targets = []
    for name, m in config.models.items():
        base = run_dir / name
        final = base / ("finetuned" if m.prune else "checkpoints") / "checkpoint_best.pt"
        fp32 = "pruned" if m.prune else "fp32"
        onnx = [Target("onnx", str(base / "onnx" / fp32), label=f"{name}/{fp32}"),
                Target("onnx", str(base / "onnx" / "int8"), label=f"{name}/int8")]
        targets += [Target("torch", str(final), label=f"{name}/{fp32}"), *onnx]
        transformer = _family(m.overrides.get("arch") or _config_arch(m.config)) == "transformer"
        if config.bench.ct2 and transformer:
            targets += [Target("ct2", str(final), "float32", label=f"{name}/fp32"),  # its output vs fairseq's
                        Target("ct2", str(final), "int8", label=f"{name}/int8")]
        if config.bench.ort_search and transformer:  # as `lite bench --ort-search`, which leaves out the others
            targets += [replace(t, search="ort") for t in onnx]
    plain = [t for t in targets if t.search == "fairseq"]
    if config.bench.shortlist is not None:  # as `lite bench --shortlist`
        targets += [replace(t, shortlist=str(_shortlist_path(run_dir))) for t in plain if t.backend in ("onnx", "ct2")]
    return targets


def _shortlist_path(run_dir: Path) -> Path:
    return run_dir / "shortlist.txt"


def _shortlist_stage(config: PipelineConfig, run_dir: Path) -> Stage:
    from lite.shortlist import build_shortlist

    settings, out = ShortlistSettings(**config.bench.shortlist), _shortlist_path(run_dir)
    return Stage("shortlist", _cmd("lite", "data", "shortlist", run_dir / "data", "--out", out, "--per-source",
                                   settings.per_source, "--frequent", settings.frequent), settings.__dict__,
                 [run_dir / "data"], [out], lambda: build_shortlist(run_dir / "data", out, settings.per_source,
                                                                    settings.frequent))


def _model_config(model_config: str) -> dict:
    try:
        return yaml.safe_load(Path(model_config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{model_config}: cannot read model config: {e}") from None


def _config_arch(model_config: str) -> str:
    return _model_config(model_config).get("arch", "")


def _bench_stage(config: PipelineConfig, run_dir: Path) -> Stage:
    from eval.bench import BenchConfig, bench
    from lite.text import read_lines

    targets = _bench_targets(config, run_dir)
    b = config.bench
    bench_config = BenchConfig(sentences=b.sentences, threads=b.threads, repeat=b.repeat, batch=b.batch)
    raw = run_dir / "data" / "raw"
    out = run_dir / "bench.json"
    split = config.data.test_split
    flags = {"torch": "--checkpoint", "onnx": "--model", "ort": "--ort-model", "ct2": "--ct2"}
    command = _cmd("lite", "bench", "--source", raw / f"{split}.{config.data.src}", "--reference",
                   raw / f"{split}.{config.data.tgt}", *[a for f, p in dict.fromkeys((flags[t.backend], t.path) for t in targets) for a in (f, p)],
                   "--ct2-quantization", "float32,int8", "--sentences", b.sentences, "--threads",
                   ",".join(map(str, b.threads)), "--repeat", b.repeat, "--batch", b.batch, "--out", out,
                   *(["--shortlist", _shortlist_path(run_dir)] if b.shortlist is not None else []),
                   *(["--ort-search"] if b.ort_search else []))

    def run():
        document = bench(targets, read_lines(raw / f"{split}.{config.data.src}"),
                         read_lines(raw / f"{split}.{config.data.tgt}"), bench_config)
        write_json(out, {**document, "command": command})

    inputs = list(dict.fromkeys(Path(p) for t in targets for p in (t.path, t.shortlist) if p))
    return Stage("bench", command, {"config": bench_config.__dict__}, inputs, [out], run)


def summary(config: PipelineConfig, run_dir: Path) -> dict:
    """``report/summary.json``: per stage bleu/macs/params/bytes, per backend latency/throughput/memory."""
    stages = {}
    for name in config.models:
        for stage, figures in json.loads((run_dir / name / "stages.json").read_text()).items():
            stages[f"{name}/{stage}"] = figures
    backends = {}
    for r in json.loads((run_dir / "bench.json").read_text())["results"]:
        if r["error"]:
            continue
        f = r["figures"]
        backends[f"{r['target']}@{r['threads']}"] = {
            "latency_ms_p50": f["latency_ms_p50"], "latency_ms_p90": f["latency_ms_p90"],
            "tokens_per_s": f["tokens_per_s"], "peak_rss_mb": f["peak_rss_mb"], "threads": r["threads"],
            "bleu": f.get("bleu"), "bytes": f["bytes"]}
    return {"name": config.name, "command": _cmd("lite", "pipeline", config.path), "stages": stages,
            "backends": backends}


def plan(config: PipelineConfig, run_dir: Path) -> list[Stage]:
    """The stages of a run, in order."""
    from eval.report import report
    stages = [_data_stage(config, run_dir)]
    if config.bench.shortlist is not None:
        stages.append(_shortlist_stage(config, run_dir))
    for name, m in config.models.items():
        stages += _model_stages(config, run_dir, name, m)
    stages.append(_bench_stage(config, run_dir))
    summary_path = run_dir / "report" / "summary.json"

    def write_summary():
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(summary_path, summary(config, run_dir))

    measured = [run_dir / name / "stages.json" for name in config.models] + [run_dir / "bench.json"]
    stages.append(Stage("summary", "(lite pipeline)", {}, measured, [summary_path], write_summary))
    stages.append(Stage("report", _cmd("lite", "report", run_dir), {}, [summary_path, run_dir / "bench.json"],
                        [run_dir / "report" / "index.html"], lambda: report([run_dir], run_dir / "report",
                                                                   command=_cmd("lite", "pipeline", config.path))))
    return stages


def run_pipeline(config: PipelineConfig, run_dir: Path | None = None, progress=None) -> list[str]:
    """Run (or resume) every stage that is not up to date in ``run_dir`` (default ``runs/<name>``); returns the
    names of the stages that ran."""
    run_dir = Path(run_dir or Path("runs") / config.name)
    with _lock(run_dir):
        return run_stages(plan(config, run_dir), Manifest(run_dir, config), progress)
