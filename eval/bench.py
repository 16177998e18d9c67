"""``lite bench``: every backend on the same sentences, in one run, so that the ratios hold on a noisy machine.

    lite bench --source test2016.de --reference test2016.en --checkpoint ck.pt --model onnx/fp32 --model onnx/int8 \\
        --ct2 ck.pt --threads 1,2 --repeat 3 --out bench.json

Targets (each measured in a fresh worker process, one after the other, so that its peak RSS is its own):
    torch   fairseq's SequenceGenerator on a checkpoint (``--checkpoint``)
    onnx    the ONNX Runtime translator on a model dir (``--model``; fp32 or int8)
    ort     the same on the dir's ORT-format graphs (``--ort-model``)
    ct2     CTranslate2 on a plain-Transformer checkpoint (``--ct2``), converted once per quantization
            (``--ct2-quantization int8,float32``) into ``<checkpoint>.ct2-<quantization>/``
With ``--shortlist VMAP`` every onnx and ct2 target is measured a second time with that vocabulary map
(``<name>+shortlist``: ours through export/shortlist.py, CTranslate2 with ``use_vmap``); with ``--ort-search``
every onnx target whose decoder fits it a second time with the whole search in ONNX Runtime's BeamSearch op
(``<name>+ort-search``, export/ort_search.py; the Transformer family).

Figures per target and thread count (the JSON's ``results``; times in ms, sizes in MB):
    load_s              seconds to build the translator (files read, sessions created)
    latency_ms_p50/p90  batch 1, beam ``--beam``, one sentence at a time, after ``--warmup`` sentences
    greedy_ms_p50/p90   batch 1, beam 1
    tokens_per_s        batch ``--batch`` (sentences sorted by length, as each runtime does best), beam ``--beam``:
                        target words (whitespace-separated) of the output per second
    rss_libs_mb         resident memory with the backend's libraries imported, no model
    rss_loaded_mb       resident memory with the model loaded, before the first sentence
    peak_rss_batch1_mb  peak resident memory after the batch-1 runs (before the batched one)
    peak_rss_mb         peak resident memory of the worker (VmHWM), all runs
    bytes               model bytes on disk (the checkpoint, the model dir, the CTranslate2 dir)
    bleu                sacreBLEU of the batch-1 beam output against ``--reference`` (if given)
    same_as_first       hypotheses equal to the first target's (same sentences, batch 1, beam)
Each result also holds its ``hypotheses`` (batch 1, beam), so that any figure of output quality can be rescored,
and ``latency_by_length``: [source words, ms] of every sentence at batch 1 (the first repeat).
With ``--repeat N`` the targets are measured in N rounds, every other round in reverse order, so that a drift of
the machine's speed during the run (on a shared machine, up to 1.8x within minutes) falls on every target alike;
each figure is the median over the repeats, and ``repeats`` holds min/median/max.
A target that cannot run (e.g. ``ct2`` on an LSRA checkpoint) gets ``error`` (one line); the others run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from lite.errors import LiteError
from lite.machine import describe

logger = logging.getLogger(__name__)
BACKENDS = ("torch", "onnx", "ort", "ct2")
TIMED = ("load_s", "latency_ms_p50", "latency_ms_p90", "greedy_ms_p50", "greedy_ms_p90", "tokens_per_s",
         "rss_libs_mb", "rss_loaded_mb", "peak_rss_batch1_mb", "peak_rss_mb")


class BenchError(LiteError, ValueError):
    """A target or option the benchmark cannot use."""


@dataclass(frozen=True)
class Target:
    backend: str  # one of BACKENDS
    path: str  # checkpoint (torch, ct2) or model dir (onnx, ort)
    quantization: str | None = None  # ct2 only: "int8", "float32", ...
    data: str | None = None  # prepared data dir, when not the one the model names
    label: str | None = None  # what the results call it (default: the path's last part)
    shortlist: str | None = None  # onnx, ct2: a vocabulary map (``lite data shortlist``)
    search: str = "fairseq"  # onnx: "ort" for ONNX Runtime's BeamSearch op

    @property
    def name(self) -> str:
        return f"{self.backend}{'-' + self.quantization if self.quantization else ''}:" \
               f"{self.label or Path(self.path).name}{'+shortlist' if self.shortlist else ''}" \
               f"{'+ort-search' if self.search == 'ort' else ''}"


def distinct_labels(targets: Sequence[Target]) -> list[Target]:
    """Targets whose names would collide (``onnx:int8`` of two model dirs) labelled by as many trailing parts of
    their paths as tell them apart (``d128/int8``, ``lsra_100m/int8``)."""
    out = list(targets)
    for depth in range(1, max((len(Path(t.path).parts) for t in targets), default=1) + 1):
        names = [t.name for t in out]
        clashing = [i for i, t in enumerate(targets) if t.label is None and names.count(out[i].name) > 1]
        if not clashing:
            break
        for i in clashing:
            out[i] = replace(targets[i], label="/".join(Path(targets[i].path).parts[-depth - 1:]))
    return out


def with_ort_search(targets: Sequence[Target]) -> list[Target]:
    """Each onnx target again with its search in ONNX Runtime's BeamSearch op (export/ort_search.py), where its
    model dir's decoder fits the op; the others are named in a warning, with the reason."""
    from export.ort_search import refusal

    out = []
    for t in targets:
        if t.backend != "onnx" or t.shortlist:
            continue
        try:
            reason = refusal(json.loads((Path(t.path) / "model.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            reason = None  # not a readable model dir: its worker says so
        if reason:
            logger.warning(f"--ort-search: {t.name} left out: {reason}")
        else:
            out.append(replace(t, search="ort"))
    return out


@dataclass(frozen=True)
class BenchConfig:
    sentences: int = 300  # the first N non-empty source lines
    threads: tuple[int, ...] = (1,)
    repeat: int = 1
    warmup: int = 5
    batch: int = 32  # throughput batch
    beam: int = 4
    lenpen: float = 1.0
    max_len_a: float = 1.2
    max_len_b: int = 10


@dataclass
class Run:
    """One target at one thread count: the worker's figures (or its error)."""

    target: str
    backend: str
    threads: int
    figures: dict = field(default_factory=dict)
    repeats: dict = field(default_factory=dict)  # figure -> {"min", "median", "max"}
    hypotheses: list = field(default_factory=list)  # batch 1, beam: one per measured sentence
    latency_by_length: list = field(default_factory=list)  # [source words, ms] per sentence (first repeat)
    error: str | None = None


# ---------------------------------------------------------------------------------------------- in the worker

def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status: VmRSS (now) or VmHWM (peak). Not ru_maxrss: Linux
    carries the parent's peak across fork + exec into it, so every worker of a parent that loaded torch would
    report at least that."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _open(target: Target, config: BenchConfig, threads: int):
    """(translator, path whose bytes count): the backend's translator at beam ``config.beam``, batch 1."""
    from export.search import SearchOptions

    options = SearchOptions(beam=config.beam, lenpen=config.lenpen, max_len_a=config.max_len_a,
                            max_len_b=config.max_len_b)
    if target.backend == "ct2":  # path: the converted dir (``resolve_ct2``)
        from export.ctranslate2 import CT2Translator

        translator = CT2Translator(target.path, target.data, beam=config.beam, lenpen=config.lenpen,
                                   max_len_a=config.max_len_a, max_len_b=config.max_len_b, threads=threads,
                                   batch_size=1, use_vmap=target.shortlist is not None)
        return translator, Path(target.path)
    if target.backend == "torch":
        import torch

        torch.set_num_threads(threads)
    from lite.translate import open_translator

    translator, _ = open_translator(target.backend, target.path, target.data, options, threads, batch_size=1,
                                    shortlist=target.shortlist, search=target.search)
    return translator, Path(target.path)


def _set_search(translator, beam: int, batch_size: int) -> None:
    """The same translator at another beam and batch size (every backend keeps its model loaded)."""
    translator.batch_size = batch_size
    if hasattr(translator, "options"):
        translator.options = replace(translator.options, beam=beam)
    else:  # CT2Translator
        translator.beam = beam


def _import_backend(backend: str) -> None:
    """Load the backend's libraries before the baseline RSS is read."""
    import numpy  # noqa: F401
    import sentencepiece  # noqa: F401

    if backend == "torch":
        import fairseq  # noqa: F401
        import torch  # noqa: F401
    elif backend == "ct2":
        import ctranslate2  # noqa: F401
    else:
        import onnxruntime  # noqa: F401


def measure(target: Target, sources: list[str], config: BenchConfig, threads: int) -> dict:
    """Every figure of one target at ``threads``, in this process (the worker). Hypotheses under ``outputs``."""
    _import_backend(target.backend)
    rss_libs = _status_mb("VmRSS")
    start = time.perf_counter()
    translator, weights = _open(target, config, threads)
    load_s = time.perf_counter() - start
    rss_loaded = _status_mb("VmRSS")
    for line in sources[:config.warmup]:
        translator.translate([line])

    def one_at_a_time(beam: int) -> tuple[list[str], list[float]]:
        _set_search(translator, beam, 1)
        outputs, ms = [], []
        for line in sources:
            start = time.perf_counter()
            outputs += translator.translate([line])
            ms.append(1000 * (time.perf_counter() - start))
        return outputs, ms

    outputs, beam_ms = one_at_a_time(config.beam)
    _, greedy_ms = one_at_a_time(1)
    peak_batch1 = _status_mb("VmHWM")
    _set_search(translator, config.beam, config.batch)
    start = time.perf_counter()
    batched = translator.translate(sources)
    seconds = time.perf_counter() - start
    return {
        "load_s": round(load_s, 3),
        "latency_ms_p50": round(statistics.median(beam_ms), 2), "latency_ms_p90": round(_percentile(beam_ms, 0.9), 2),
        "greedy_ms_p50": round(statistics.median(greedy_ms), 2),
        "greedy_ms_p90": round(_percentile(greedy_ms, 0.9), 2),
        "tokens_per_s": round(sum(len(h.split()) for h in batched) / seconds, 1),
        "rss_libs_mb": round(rss_libs, 1), "rss_loaded_mb": round(rss_loaded, 1),
        "peak_rss_batch1_mb": round(peak_batch1, 1), "peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "bytes": _bytes(weights), "outputs": outputs,
        "latency_by_length": [[len(line.split()), round(ms, 2)] for line, ms in zip(sources, beam_ms)],
    }


def _worker() -> None:
    """Read {target, sources, config, threads} as JSON on stdin, print the figures as JSON (or an error)."""
    job = json.loads(sys.stdin.read())
    config = BenchConfig(**{**job["config"], "threads": tuple(job["config"]["threads"])})
    try:
        result = measure(Target(**job["target"]), job["sources"], config, job["threads"])
    except LiteError as e:
        result = {"error": str(e)}
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------- the run

def resolve_ct2(target: Target) -> Target:
    """A ``ct2`` target on its checkpoint -> the same on its CTranslate2 dir (converted on first use, beside the
    checkpoint; with the shortlist as its vocabulary map, in a dir named by the map's hash) and data dir, so that
    the worker loads CTranslate2 alone."""
    from export.ctranslate2 import VMAP, convert_to_ctranslate2
    from lite.checkpoint import data_dir, read_state

    out = Path(f"{target.path}.ct2-{target.quantization or 'float32'}")
    if target.shortlist is not None:
        digest = hashlib.sha256(Path(target.shortlist).read_bytes()).hexdigest()[:12]
        out = out.with_name(f"{out.name}-vmap-{digest}")
    if not (out / "model.bin").is_file() or (target.shortlist is not None and not (out / VMAP).is_file()):
        convert_to_ctranslate2(target.path, out, target.quantization, force=out.exists(), data=target.data,
                               vmap=target.shortlist)
    return replace(target, path=str(out), data=str(target.data or data_dir(read_state(target.path))))


def _run_worker(target: Target, sources: list[str], config: BenchConfig, threads: int) -> dict:
    # CTranslate2 runs as its users run it (its default backend); CT2_USE_MKL=1 in the environment switches an AMD
    # CPU from oneDNN (fast int8, but ~12 BLEU lost on the tiny test model) to MKL (~0.1 lost, slower int8)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    job = json.dumps({"target": asdict(target), "sources": sources, "config": asdict(config), "threads": threads})
    proc = subprocess.run([sys.executable, "-c", "from eval.bench import _worker; _worker()"], input=job,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"error": f"worker exited with {proc.returncode}: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(targets: Sequence[Target], sources: Sequence[str], references: Sequence[str] | None = None,
          config: BenchConfig = BenchConfig(), progress=None) -> dict:
    """Measure every target at every thread count (``config.repeat`` rounds over all targets); the JSON document."""
    pairs = [(s, r) for s, r in zip(sources, references or [None] * len(sources)) if s.strip()][:config.sentences]
    if not pairs:
        raise BenchError("the source file has no non-empty line to translate")
    if references is not None and len(references) != len(sources):
        raise BenchError(f"{len(sources)} source lines but {len(references)} references")
    lines = [s for s, _ in pairs]
    runs, first_outputs, resolved = [], None, {}
    for target in targets:
        try:
            resolved[target] = resolve_ct2(target) if target.backend == "ct2" else target
        except LiteError as e:  # e.g. an LSRA checkpoint: CTranslate2 runs the Transformer only
            resolved[target] = e
    for threads in config.threads:
        repeats = {t: [] for t in targets if not isinstance(resolved[t], LiteError)}  # target -> worker results
        for round_ in range(config.repeat):  # every target once a round, in reverse order every other round
            for target in list(repeats)[::-1 if round_ % 2 else 1]:
                if repeats[target] and "error" in repeats[target][-1]:
                    continue
                repeats[target].append(_run_worker(resolved[target], lines, config, threads))
                if progress:
                    progress(target, threads)
        for target in targets:
            if isinstance(resolved[target], LiteError):
                runs.append(Run(target.name, target.backend, threads, error=str(resolved[target])))
                continue
            run = _summary(target, threads, repeats[target], first_outputs,
                           [r for _, r in pairs] if references is not None else None)
            first_outputs = first_outputs if first_outputs is not None or run.error else run.hypotheses
            runs.append(run)
    return {"config": asdict(config), "targets": [asdict(t) for t in targets], "machine": describe(),
            "results": [asdict(r) for r in runs]}


def _summary(target: Target, threads: int, repeats: list, first_outputs: list | None,
             references: list | None) -> Run:
    """One target's figures at one thread count: the median over its repeats (its first error, if any)."""
    from eval.bleu import corpus_bleu

    run = Run(target.name, target.backend, threads)
    if "error" in repeats[-1]:
        run.error = repeats[-1]["error"]
        return run
    outputs = repeats[0].pop("outputs")
    run.latency_by_length = repeats[0].pop("latency_by_length")
    run.hypotheses = outputs
    run.figures = {k: statistics.median(r[k] for r in repeats) for k in TIMED}
    run.figures["bytes"] = repeats[0]["bytes"]
    run.figures["sentences"] = len(outputs)
    run.figures["same_as_first"] = sum(a == b for a, b in zip(outputs, first_outputs or outputs))
    if references is not None:
        run.figures["bleu"] = round(corpus_bleu(outputs, references), 2)
    if len(repeats) > 1:
        run.repeats = {k: {"min": min(r[k] for r in repeats), "median": run.figures[k],
                           "max": max(r[k] for r in repeats)} for k in TIMED}
    return run


def markdown(document: dict) -> str:
    """The results as a Markdown table, with each target's speed-up over the first at the same thread count."""
    rows = ["| target | threads | ms/sent. beam p50 (p90) | greedy p50 | tokens/s | × first | peak RSS MB | "
            "MB on disk | BLEU | = first |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base: dict[int, float] = {}
    for r in document["results"]:
        if r["error"]:
            rows.append(f"| {r['target']} | {r['threads']} | {r['error']} ||||||||")
            continue
        f = r["figures"]
        base.setdefault(r["threads"], f["latency_ms_p50"])
        rows.append(f"| {r['target']} | {r['threads']} | {f['latency_ms_p50']:.1f} ({f['latency_ms_p90']:.1f}) | "
                    f"{f['greedy_ms_p50']:.1f} | {f['tokens_per_s']:.0f} | "
                    f"{base[r['threads']] / f['latency_ms_p50']:.2f} | {f['peak_rss_mb']:.0f} | "
                    f"{f['bytes'] / 1e6:.2f} | {f.get('bleu', '–')} | {f['same_as_first']}/{f['sentences']} |")
    machine = document.get("machine") or {}
    if machine.get("cpu"):
        isa = machine["isa"] or "no vector extension named"
        rows.append(f"\nOn {machine['cpu']} ({isa}), {machine['cores']} cores.")
    return "\n".join(rows)
