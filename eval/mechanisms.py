"""The README's table of token mixers side by side (``lite macs --mechanisms [--run-dir runs/multi30k_100m ...]
[--eval EVAL.json ...] [--eval-2000 EVAL.json ...] [--bench bench.json] [--record RECORD.json]``): paper, where each
can serve, what a decoding step keeps, MACs at its 100M preset and, from pipeline runs (or a checkpoint's ``lite
eval``), the preset's BLEU (fp32, the run's test split), the updates of the checkpoint it is from (what its CPU-time
budget bought: machines and sittings differ), the BLEU of the run's checkpoint at 2,000 updates (``--eval-2000``:
what ranks runs whose sittings bought different counts), its int8 ONNX latency at 1 thread (batch 1, beam 4, p50)
and the int8 model's speed-up over fairseq on the checkpoint it was exported from, timed in the same run — or, with
``--bench``, every latency and speed-up from that one ``lite bench`` run. Latencies from runs on other days compare
only as the speed-ups do: as ratios measured in one run.

A record (``--record``) keeps the figures, each with the run it came from, beside the README: run dirs are
machine-local and can be lost, the table's figures then still regenerate. The table starts from the record, the
figures of the runs given replace its entries, and the record is rewritten.

Every mixer in ``lite.modules.MIXERS`` needs its row here (tests/eval/test_mechanisms.py checks).
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from eval.bench import Target
from eval.macs import MacsError, paper_macs
from eval.macs_protocol import VOCAB_SIZE
from eval.macs_table import millions
from lite.checkpoint import read_state
from lite.files import write_text
from lite.models.factory import build_arch
from lite.modules import CAUSAL_MIXERS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mechanism:
    mixer: str  # its name in MIXERS (--encoder-mixer / --decoder-mixer)
    paper: str
    state: str  # what one decoding step keeps: grows with t (O(t)) or not (O(1)); "" when encoder only
    presets: tuple[str, ...]  # the 100M presets built on it (none: a building block only)
    no_decoder: str = ""  # why it has no causal form (encoder only); "" when it has one


MECHANISMS = (
    Mechanism("attention", "Vaswani et al. 2017, Transformer", "O(t): keys/values", ("transformer_100m",)),
    Mechanism("lsra", "Wu et al. 2020, Lite Transformer (LSRA)", "O(t): half-width keys/values + K-1 frames",
              ("lsra_100m",)),
    Mechanism("conv", "Wu et al. 2019, lightweight/dynamic convolution", "O(1): K-1 frames", ()),
    Mechanism("gau", "Hua et al. 2022, FLASH (gated attention unit)",
              "FLASH-Quad O(t): keys/values; FLASH O(1): current chunk + linear state",
              ("flash_quad_100m", "flash_100m")),
    Mechanism("fastformer", "Wu et al. 2021, Fastformer", "O(1): running sums", ("fastformer_100m",)),
    Mechanism("linear", "Katharopoulos et al. 2020, Linear Transformer", "O(1): S = sum phi(k) v^T, z",
              ("linear_100m",)),
    Mechanism("performer", "Choromanski et al. 2021, Performer (FAVOR+)", "O(1): S, z", ("performer_100m",)),
    Mechanism("local", "Parmar et al. 2018, Image Transformer (1-D local)", "O(1): last 2 blocks",
              ("local_100m",)),
    Mechanism("synthesizer_dense", "Tay et al. 2020, Synthesizer (dense)", "O(t): values",
              ("synthesizer_dense_100m",)),
    Mechanism("synthesizer_random", "Tay et al. 2020, Synthesizer (random)", "O(t): values",
              ("synthesizer_random_100m",)),
    Mechanism("linformer", "Wang et al. 2020, Linformer", "", ("linformer_100m",),
              "the length projection mixes every position"),
    Mechanism("memory_compressed", "Liu et al. 2018, memory-compressed attention", "", ("memory_compressed_100m",),
              "its state would gain a slot every s steps, at other steps in differently padded rows"),
    Mechanism("strided", "Child et al. 2019, Sparse Transformer (strided)", "O(t): keys/values", ("strided_100m",)),
    Mechanism("longformer", "Beltagy et al. 2020, Longformer (window + global)", "O(t): keys/values",
              ("longformer_100m",)),
    Mechanism("bigbird", "Zaheer et al. 2020, BigBird (window + global + random)", "", ("bigbird_100m",),
              "random keys look ahead"),
    Mechanism("isab", "Lee et al. 2019, Set Transformer (ISAB)", "", ("isab_100m",),
              "the inducing points summarize the whole sentence"),
    Mechanism("routing", "Roy et al. 2021, Routing Transformer (k-means clusters)",
              "O(t): keys/values + key clusters", ("routing_100m",)),
    Mechanism("sinkhorn", "Tay et al. 2020, Sparse Sinkhorn Attention (local + sorted block)",
              "O(t): keys/values + input frames + column sums", ("sinkhorn_100m",)),
    Mechanism("poolingformer", "Zhang et al. 2021, Poolingformer (window + pooled window)", "",
              ("poolingformer_100m",), "the pooled windows look ahead"),
    Mechanism("reformer", "Kitaev et al. 2020, Reformer (shared-QK LSH; encoder: sorted chunks; decoder: unchunked)",
              "O(t): keys/values + buckets", ("reformer_100m",)),
)
PRESETS = tuple(preset for m in MECHANISMS for preset in m.presets)


def run_figures(run_dirs: Sequence[str | Path] = ()) -> dict[str, dict]:
    """{arch: {"bleu", "bleu_from"[, "updates", "updates_from"][, "bleu_fixed", ...][, "latency_ms", ...][,
    "speedup", ...]}} from pipeline runs' ``report/summary.json``: fp32 BLEU, the updates of its checkpoint (where it
    is still there), the BLEU at FIXED_UPDATES (where the run's ``eval_at_updates`` has it), and the int8 ONNX
    latency at 1 thread and its speed-up over the fp32 checkpoint in fairseq where the int8 model is that one (not a
    pruned one, which has fewer MACs). A preset in several runs takes the figures of the last one given."""
    figures = {}
    for run_dir in run_dirs:
        figures.update(_figures(run_dir))
    return figures


def _figures(run_dir: str | Path) -> dict[str, dict]:
    summary = json.loads((Path(run_dir) / "report" / "summary.json").read_text(encoding="utf-8"))
    figures = {}
    for name, stage in summary["stages"].items():
        family, kind = name.split("/", 1)
        if kind == "fp32":
            same = summary["stages"].get(f"{family}/int8", {}).get("macs") == stage.get("macs")
            int8 = summary["backends"].get(f"onnx:{family}/int8@1", {}) if same else {}
            fairseq = summary["backends"].get(f"torch:{family}/fp32@1", {})
            found = {"bleu": stage["bleu"], "bleu_from": f"`{run_dir}` (`lite pipeline`)",
                     "updates": checkpoint_updates(Path(run_dir) / family / "checkpoints" / "checkpoint_best.pt"),
                     "bleu_fixed": stage.get("bleu_at_updates", {}).get(str(FIXED_UPDATES)),
                     "latency_ms": int8.get("latency_ms_p50"),
                     "speedup": speedup(fairseq.get("latency_ms_p50"), int8.get("latency_ms_p50"))}
            figures[stage["arch"]] = _with_sources(found, found["bleu_from"])
    return figures


def speedup(fairseq_ms: float | None, int8_ms: float | None) -> float | None:
    """fairseq's latency over the int8 model's, both from one run; None without both."""
    return None if fairseq_ms is None or int8_ms is None else round(fairseq_ms / int8_ms, 2)


def checkpoint_updates(checkpoint: Path) -> int | None:
    """The updates a checkpoint was trained for (fairseq's ``optimizer_history``); None when it is gone."""
    return read_state(checkpoint)["optimizer_history"][-1]["num_updates"] if checkpoint.is_file() else None


FIXED_UPDATES = 2_000  # the count at which every preset's checkpoint is also compared (a CPU-minute's worth of
# updates moves with the machine's load; the inverse-sqrt learning rate follows the update count alone)
FIELDS = (("bleu", "bleu_from"), ("updates", "updates_from"), ("bleu_fixed", "bleu_fixed_from"),
          ("latency_ms", "latency_from"), ("speedup", "speedup_from"))
BENCH_FIELDS = ("latency", "speedup")  # what one bench run gives
TRAINING_FIELDS = ("updates", "bleu_fixed")  # a training's figures besides its BLEU: a new BLEU takes them away


def _with_sources(found: dict, source: str) -> dict:
    """The figures found, each with its source; those not found left out."""
    return {key: value for field, from_ in FIELDS if found.get(field) is not None
            for key, value in ((field, found[field]), (from_, source))}


@lru_cache(maxsize=None)
def preset_macs(preset: str) -> int:
    return paper_macs(build_arch(preset, VOCAB_SIZE)).total


def eval_figures(eval_jsons: Sequence[str | Path], fixed: bool = False) -> dict[str, dict]:
    """{arch: {"bleu", "bleu_from"[, "updates", "updates_from"]}} from ``lite eval --checkpoint`` results, by the
    checkpoint's arch; with ``fixed``, {arch: {"bleu_fixed", "bleu_fixed_from"}} from checkpoints at FIXED_UPDATES
    (any other count refused). One whose MACs are not its preset's (pruned, or trained with other widths) is left
    out with a warning. The last one given wins."""
    from lite.checkpoint import load_model

    flag = "--eval-2000" if fixed else "--eval"
    figures = {}
    for path in eval_jsons:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        if result.get("backend") != "torch":
            raise MacsError(f"{path}: a {result.get('backend')} result; {flag} takes a checkpoint's (fp32) "
                            "`lite eval --checkpoint` result")
        checkpoint = Path(result["checkpoint"])
        if not checkpoint.is_file():
            raise MacsError(f"{path}: its checkpoint {checkpoint} is gone (moved or deleted?): its preset "
                            "cannot be told")
        updates = checkpoint_updates(checkpoint)
        if fixed and updates != FIXED_UPDATES:
            raise MacsError(f"{path}: its checkpoint {checkpoint} was trained for {updates:,} updates; {flag} takes "
                            f"one at {FIXED_UPDATES:,} (a run keeps checkpoint_E_{FIXED_UPDATES}.pt)")
        model, _ = load_model(checkpoint)
        arch, macs = model.args.arch, paper_macs(model).total
        if macs != preset_macs(arch):
            logger.warning(f"{path}: {millions(macs)} MACs, not {arch}'s {millions(preset_macs(arch))} (pruned?): "
                           "left out of the table")
            continue
        found = {"bleu_fixed": result["bleu"]} if fixed else {"bleu": result["bleu"], "updates": updates}
        figures[arch] = _with_sources(found, f"`{path}` (`lite eval --checkpoint`)")
    return figures


def bench_figures(bench_json: str | Path) -> dict[str, dict[str, float]]:
    """{arch: {"latency_ms"[, "speedup"]}} of a ``lite bench`` run's int8 ONNX model dirs at 1 thread, with our
    search (the arch from each dir's model.json; a target that failed gives none): the p50 latency and, where the
    run also timed fairseq on the checkpoint the dir was exported from (model.json's ``checkpoint``), fairseq's p50
    over it. A dir whose MACs are not its preset's (pruned, or trained with other widths) is left out with a warning:
    its latency is not the preset's."""
    bench = json.loads(Path(bench_json).read_text(encoding="utf-8"))
    targets = [Target(**t) for t in bench["targets"]]
    paths = {t.name: t.path for t in targets if t.backend == "onnx" and not t.shortlist and t.search == "fairseq"}
    checkpoints = {t.name: str(Path(t.path).resolve()) for t in targets if t.backend == "torch"}
    at_one_thread = [r for r in bench["results"] if r["threads"] == 1 and not r["error"]]
    fairseq_ms = {checkpoints[r["target"]]: r["figures"]["latency_ms_p50"] for r in at_one_thread
                  if r["target"] in checkpoints}
    figures, seen = {}, {}
    for result in at_one_thread:
        if result["target"] not in paths:
            continue
        model_dir = Path(paths[result["target"]])
        if not (model_dir / "model.json").is_file():
            raise MacsError(f"{bench_json}: its target {result['target']} names {model_dir}, which holds no "
                            "model.json (moved or deleted?): its preset cannot be told; rerun the bench")
        description = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
        if not description.get("quantization"):
            continue  # fp32
        arch, macs = description["arch"], description.get("macs")
        if macs is None:
            raise MacsError(f"{model_dir}: its model.json does not record the model's MACs (exported by an earlier "
                            "version): export and quantize it again to tell whether it is its preset")
        if macs != preset_macs(arch):
            logger.warning(f"{model_dir}: {millions(macs)} MACs, not {arch}'s {millions(preset_macs(arch))} "
                           "(pruned?): left out of the table")
            continue
        if arch in seen:
            raise MacsError(f"{bench_json}: two int8 models of {arch} ({seen[arch]}, {model_dir}); "
                            "bench one per preset")
        latency = result["figures"]["latency_ms_p50"]
        found = {"latency_ms": latency, "speedup": speedup(fairseq_ms.get(description.get("checkpoint")), latency)}
        seen[arch], figures[arch] = model_dir, {k: v for k, v in found.items() if v is not None}
    return figures


def read_record(path: str | Path) -> dict[str, dict]:
    """{arch: {"bleu", "bleu_from", "updates", "updates_from", "latency_ms", "latency_from"}} kept in a record (each
    figure where it has one); {} before its first table."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))["presets"]
        unknown = sorted(set(record) - set(PRESETS))
        for arch, found in record.items():  # each figure a number with the run it came from
            for field, source in FIELDS:
                if arch in unknown or field not in found:
                    continue
                number = int if field == "updates" else (int, float)
                if not (isinstance(found[field], number) and isinstance(found.get(source), str)):
                    raise TypeError(f"{arch}: {field} {found[field]!r} from {found.get(source)!r}")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise MacsError(f"{path}: not a record of `lite macs --mechanisms --record` ({type(e).__name__}: {e})")
    if unknown:
        raise MacsError(f"{path}: no such 100M preset: {', '.join(unknown)} (presets: {', '.join(PRESETS)})")
    return record


def _merged(kept: dict[str, dict], new: dict[str, dict]) -> dict[str, dict]:
    """The record's figures, each replaced by a new one where there is one, with the run it came from; a new BLEU
    takes the record's updates and BLEU at FIXED_UPDATES away with the old BLEU (they are its training's)."""
    figures = {arch: dict(found) for arch, found in kept.items()}
    for arch, found in new.items():
        if found.get("bleu") is not None and arch in figures:
            figures[arch] = {k: v for k, v in figures[arch].items() if not k.startswith(TRAINING_FIELDS)}
        for field, source in FIELDS:
            if found.get(field) is not None:
                figures.setdefault(arch, {}).update({field: found[field], source: found[source]})
    return {arch: figures[arch] for arch in PRESETS if arch in figures}


def _sources(figures: dict[str, dict], field: str, source: str) -> str:
    """'`run` (`tool`) for `a`, `b`; ...': which run gave which presets' figure."""
    presets = defaultdict(list)
    for arch, found in figures.items():
        if found.get(field) is not None:
            presets[found[source]].append(f"`{arch}`")
    return "; ".join(f"{run} for {', '.join(archs)}" for run, archs in presets.items())


COLUMNS = (("bleu", ".2f", ""), ("updates", ",d", ""), ("bleu_fixed", ".2f", ""), ("latency_ms", ".1f", ""),
           ("speedup", ".1f", "×"))  # the figures' columns: field, format, unit


def _shown(figure, form: str, unit: str) -> str:
    return "–" if figure is None else format(figure, form) + unit


def markdown_table(run_dirs: Sequence[str | Path] = (), bench_json: str | Path | None = None,
                   eval_jsons: Sequence[str | Path] = (), record: str | Path | None = None,
                   fixed_eval_jsons: Sequence[str | Path] = ()) -> str:
    new = {**run_figures(run_dirs), **eval_figures(eval_jsons)}
    for arch, found in eval_figures(fixed_eval_jsons, fixed=True).items():
        new.setdefault(arch, {}).update(found)
    if bench_json is not None:  # every latency and speed-up it has from this one run
        new = {arch: {k: v for k, v in found.items() if not k.startswith(BENCH_FIELDS)} for arch, found in new.items()}
        for arch, found in bench_figures(bench_json).items():
            new.setdefault(arch, {}).update(_with_sources(found, f"`{bench_json}` (one `lite bench` run)"))
    figures = _merged(read_record(record) if record else {}, new)
    if record:
        write_text(record, json.dumps({"presets": figures}, indent=1, ensure_ascii=False) + "\n")
    rows = ["| mixer | paper | encoder | decoder | decoding state per step | 100M preset | MACs | BLEU | updates | "
            f"BLEU at {FIXED_UPDATES:,} updates | int8 ms/sentence | int8 speed-up over fairseq |",
            "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in MECHANISMS:
        decoder = "yes" if m.mixer in CAUSAL_MIXERS else f"no: {m.no_decoder} (its preset's decoder: attention)"
        for preset in m.presets or ("",):
            macs = millions(preset_macs(preset)) if preset else "–"
            found = figures.get(preset, {})
            shown = [_shown(found.get(field), form, unit) for field, form, unit in COLUMNS]
            rows.append(f"| `{m.mixer}` | {m.paper} | yes | {decoder} | {m.state or '–'} | "
                        f"{f'`{preset}`' if preset else '– (inside LSRA)'} | {macs} | {' | '.join(shown)} |")
    names = ("BLEU", "Updates", f"BLEU at {FIXED_UPDATES:,} updates", "Latency", "Speed-up")
    source = "".join(f" {what} from {sources}." for what, (field, from_) in zip(names, FIELDS)
                     if (sources := _sources(figures, field, from_)))
    if record:
        source += f" Kept in `{record}`."
    note = ("\nMACs: the paper's protocol (`lite macs`). BLEU: fp32, the pipeline's test split, beam 4; updates: "
            "those of the checkpoint the BLEU is from, in a pipeline run its best-valid one within its CPU-time budget "
            f"(a CPU-minute buys more of them on a quiet machine); BLEU at {FIXED_UPDATES:,} updates: the same run's "
            "checkpoint at that count, which ranks runs from sittings whose CPU-minutes bought different counts; "
            "latency: int8 ONNX Runtime, 1 thread, batch 1, beam 4, p50 (`lite bench`); speed-up: fairseq's latency on "
            "the checkpoint the int8 model was exported from over the int8 model's, both from one run (latencies from "
            "runs on other days compare only as such ratios); – where no run has such a figure."
            f"{source} Generated by `lite macs --mechanisms`.")
    return "\n".join(rows) + "\n" + note
