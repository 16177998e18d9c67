"""``lite report``: one static HTML page and its Markdown twin, with plots, from pipeline and bench runs.

    lite report runs/embedded runs/multi30k_100m [--out DIR] [--title TEXT]

Inputs per RUN_DIR (either or both; a RUN_DIR with neither is an error):
    report/summary.json  written by ``lite pipeline``: per stage bleu, macs, params, params_no_embed, bytes, arch,
                         family, budget; per backend latency_ms_p50/p90, tokens_per_s, peak_rss_mb, threads, bleu,
                         bytes; and the ``command`` that wrote it
    bench.json           written by ``lite bench --out`` (eval/bench.py documents it); a ``command`` key if present
A summary backend that bench.json of the same run also measured (same target, same threads) is shown once, from
bench.json.

Out (default ``<first RUN_DIR>/report``, beside summary.json): ``index.html`` (every image embedded as a base64
PNG: it opens offline), ``report.md`` (the same tables, images as the PNG files beside it), and per plot
``<plot>.png`` and ``<plot>.json``: the points drawn, with the files they came from and the command that wrote each.

Plots (a plot whose data is missing is left out, with a one-line note):
    bleu_vs_macs       BLEU vs MACs of every stage of every run; the Pareto frontier: the points that no other
                       point beats on both (BLEU >= and MACs <=, one of them strictly)
    bleu_vs_latency    BLEU vs latency per sentence (p50, batch 1) of each backend at each thread count
    size_by_stage      bytes of the deployable artifact by compression stage, per run
    latency_vs_length  latency per sentence (batch 1) vs its source words, per backend: each sentence, and the
                       median per bucket of 5 source words (``BUCKET_WORDS``)
Tables: the stages (BLEU, MACs, params, MB) and the backends (ms p50/p90, tokens/s, peak RSS, MB, BLEU, and the
speed-up over the first backend of the same run at the same thread count, as in ``lite bench``).
"""
from __future__ import annotations

import base64
import html
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lite.errors import LiteError
from lite.files import write_bytes, write_json, write_text

SUMMARY = Path("report") / "summary.json"
BENCH = Path("bench.json")
BUCKET_WORDS = 5
PLOTS = ("bleu_vs_macs", "bleu_vs_latency", "size_by_stage", "latency_vs_length")
STAGE_NUMBERS = ("bleu", "macs", "params", "params_no_embed", "bytes")
BACKEND_NUMBERS = ("latency_ms_p50", "latency_ms_p90", "tokens_per_s", "peak_rss_mb", "bleu", "bytes")


class ReportError(LiteError, ValueError):
    """A RUN_DIR or input file the report cannot use."""


@dataclass(frozen=True)
class Source:
    """A JSON file a figure was drawn from, and the command that wrote it (None: not recorded in the file)."""

    file: str
    command: str | None


@dataclass
class Run:
    """One RUN_DIR's inputs, checked and flattened: one dict per stage and per backend (each names its ``file``)."""

    dir: Path
    name: str
    sources: dict[str, Source] = field(default_factory=dict)  # file -> Source
    stages: list[dict] = field(default_factory=list)
    backends: list[dict] = field(default_factory=list)


@dataclass
class Plot:
    name: str  # one of PLOTS: the file names <name>.png and <name>.json
    title: str
    data: dict
    sources: list[Source]


# ------------------------------------------------------------------------------------------------------ inputs

def _read(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e}); rerun the command that wrote it") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(document, dict):
        raise ReportError(f"{path}: a JSON {type(document).__name__}, not an object; rerun the command that wrote it")
    return document


def _number(value, file: str, where: str):
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise ReportError(f"{file}: {where} is {value!r}, not a number or null; fix it or rerun the command that wrote it")


def _object(value, file: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise ReportError(f"{file}: {where} is not an object; fix it or rerun the command that wrote it")
    return value


def _summary_rows(document: dict, file: str, run: str) -> tuple[list[dict], list[dict]]:
    stages = []
    for stage, s in _object(document.get("stages", {}), file, "stages").items():
        s = _object(s, file, f"stages.{stage}")
        row = {"run": run, "stage": stage, "file": file,
               **{k: _number(s.get(k), file, f"stages.{stage}.{k}") for k in STAGE_NUMBERS}}
        row.update({k: s.get(k) for k in ("arch", "family", "budget")})
        stages.append(row)
    backends = []
    for target, b in _object(document.get("backends", {}), file, "backends").items():
        b = _object(b, file, f"backends.{target}")
        row = {"run": run, "target": target, "backend": target.split(":")[0].split("-")[0], "file": file,
               "threads": _number(b.get("threads"), file, f"backends.{target}.threads"), "error": None,
               "latency_by_length": []}
        row.update({k: _number(b.get(k), file, f"backends.{target}.{k}") for k in BACKEND_NUMBERS})
        backends.append(row)
    return stages, backends


def _bench_rows(document: dict, file: str, run: str) -> list[dict]:
    results = document.get("results")
    if not isinstance(results, list):
        raise ReportError(f"{file}: no 'results' list; is it the --out of lite bench?")
    rows = []
    for i, r in enumerate(results):
        r = _object(r, file, f"results[{i}]")
        if "target" not in r:
            raise ReportError(f"{file}: results[{i}] has no 'target'; is it the --out of lite bench?")
        figures = _object(r.get("figures") or {}, file, f"results[{i}].figures")
        row = {"run": run, "target": r["target"], "backend": r.get("backend") or r["target"].split(":")[0],
               "file": file, "threads": _number(r.get("threads"), file, f"results[{i}].threads"),
               "error": r.get("error")}
        row.update({k: _number(figures.get(k), file, f"results[{i}].figures.{k}") for k in BACKEND_NUMBERS})
        pairs = r.get("latency_by_length") or []
        for j, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(
                    _number(v, file, f"results[{i}].latency_by_length[{j}]") is not None for v in pair)):
                raise ReportError(f"{file}: results[{i}].latency_by_length[{j}] is {pair!r}, not [words, ms]")
        row["latency_by_length"] = [list(p) for p in pairs]
        rows.append(row)
    return rows


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """A RUN_DIR's summary.json and bench.json, checked; a ReportError names the file (and field) that is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run dir")
    summary_path, bench_path = run_dir / SUMMARY, run_dir / BENCH
    if not summary_path.is_file() and not bench_path.is_file():
        raise ReportError(f"{run_dir}: nothing to report: neither {SUMMARY} (lite pipeline) nor {BENCH} "
                          f"(lite bench --out) is there")
    summary = _read(summary_path) if summary_path.is_file() else None
    bench = _read(bench_path) if bench_path.is_file() else None
    run = Run(run_dir, name or (summary or {}).get("name") or run_dir.resolve().name)
    bench_rows = []
    if bench is not None:
        run.sources[str(bench_path)] = Source(str(bench_path), bench.get("command"))
        bench_rows = _bench_rows(bench, str(bench_path), run.name)
    if summary is not None:
        run.sources[str(summary_path)] = Source(str(summary_path), summary.get("command"))
        run.stages, summary_rows = _summary_rows(summary, str(summary_path), run.name)
        measured = {(r["target"], r["threads"]) for r in bench_rows}
        run.backends = [r for r in summary_rows if (r["target"], r["threads"]) not in measured]
    run.backends = bench_rows + run.backends
    return run


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Every RUN_DIR, each under a name of its own (the summary's name or the dir's; the path where those clash)."""
    if not run_dirs:
        raise ReportError("no RUN_DIR given")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for run, run_dir in zip(runs, run_dirs):
        if names.count(run.name) > 1:
            run.name = str(run_dir)
            for row in run.stages + run.backends:
                row["run"] = run.name
    return runs


# --------------------------------------------------------------------------------------------- plot data

def pareto_frontier(points: Sequence[dict]) -> list[dict]:
    """The points no other point dominates (BLEU >= and MACs <=, one of them strictly), by MACs."""
    def dominated(p: dict) -> bool:
        return any(q["bleu"] >= p["bleu"] and q["macs"] <= p["macs"]
                   and (q["bleu"], q["macs"]) != (p["bleu"], p["macs"]) for q in points)

    return sorted((p for p in points if not dominated(p)), key=lambda p: (p["macs"], p["bleu"]))


def length_medians(pairs: Sequence[Sequence[float]], width: int = BUCKET_WORDS) -> list[dict]:
    """Per bucket of source lengths (words 1..width, width+1..2*width, ...): its sentences' median length and
    median latency."""
    buckets: dict[int, list] = {}
    for words, ms in pairs:
        buckets.setdefault(max(0, (int(words) - 1) // width), []).append((words, ms))
    return [{"words_min": k * width + 1, "words_max": (k + 1) * width, "sentences": len(v),
             "median_words": statistics.median(w for w, _ in v), "median_ms": statistics.median(ms for _, ms in v)}
            for k, v in sorted(buckets.items())]


def _sources(runs: Sequence[Run], files: set[str]) -> list[Source]:
    return [s for run in runs for f, s in run.sources.items() if f in files]


def _label(row: dict) -> str:
    return f"{row['target']} ({row['threads']} thr)"


def plot_data(runs: Sequence[Run]) -> tuple[list[Plot], list[str]]:
    """The plots that have data, and a one-line note for each left out."""
    stages = [s for run in runs for s in run.stages]
    backends = [b for run in runs for b in run.backends if not b["error"]]
    plots, notes = [], []

    def add(name: str, title: str, rows: list[dict], data: dict, missing: str) -> None:
        if rows:
            plots.append(Plot(name, title, data, _sources(runs, {r["file"] for r in rows})))
        else:
            notes.append(f"{title}: left out, {missing}.")

    keys = ("run", "stage", "family", "budget", "arch", "bleu", "macs")
    rows = [s for s in stages if s["bleu"] is not None and s["macs"] is not None]
    points = [{k: s[k] for k in keys} for s in rows]
    add("bleu_vs_macs", "BLEU vs MACs", rows, {"points": points, "frontier": pareto_frontier(points)},
        f"no stage with both bleu and macs in any {SUMMARY}")
    rows = [b for b in backends if b["bleu"] is not None and b["latency_ms_p50"] is not None]
    add("bleu_vs_latency", "BLEU vs latency (p50, batch 1)", rows,
        {"points": [{k: b[k] for k in ("run", "target", "backend", "threads", "latency_ms_p50", "bleu")}
                    for b in rows]},
        f"no backend with both bleu and latency_ms_p50 in any {BENCH} or {SUMMARY}")
    rows = [s for s in stages if s["bytes"] is not None]
    add("size_by_stage", "Size of the deployable artifact by compression stage", rows,
        {"bars": [{k: s[k] for k in ("run", "stage", "bytes")} for s in rows]},
        f"no stage with bytes in any {SUMMARY}")
    rows = [b for b in backends if b["latency_by_length"]]
    add("latency_vs_length", "Latency vs source length (batch 1)", rows,
        {"bucket_words": BUCKET_WORDS,
         "series": [{"run": b["run"], "target": b["target"], "threads": b["threads"],
                     "latency_by_length": b["latency_by_length"], "medians": length_medians(b["latency_by_length"])}
                    for b in rows]},
        f"no latency_by_length in any {BENCH}")
    return plots, notes


# ----------------------------------------------------------------------------------------------------- tables

@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    text: frozenset[str] = frozenset()  # the headers of left-aligned (text) columns; the others are numbers

    def markdown(self) -> str:
        rule = "".join("|---" if h in self.text else "|---:" for h in self.headers)
        lines = ["| " + " | ".join(self.headers) + " |", rule + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" if h in self.text else
                                        f'<td class="n">{html.escape(c)}</td>' for h, c in zip(self.headers, row))
                       + "</tr>\n" for row in self.rows)
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def stages_table(runs: Sequence[Run]) -> Table:
    rows = [[s["run"], s["stage"], s["family"] or "–", s["arch"] or "–", s["budget"] or "–",
             _fmt(s["bleu"], ".2f"), _fmt(s["macs"], ".1f", 1e6), _fmt(s["params"], ".3f", 1e6),
             _fmt(s["params_no_embed"], ".3f", 1e6), _fmt(s["bytes"], ".2f", 1e6)] for run in runs for s in run.stages]
    text = ("run", "stage", "family", "arch", "budget")
    return Table("Stages", [*text, "BLEU", "MACs (M)", "params (M)", "params w/o embed (M)", "MB"], rows,
                 frozenset(text))


def backends_table(runs: Sequence[Run]) -> Table:
    rows = []
    for run in runs:
        first: dict = {}  # threads -> latency of the run's first backend measured at that thread count
        for b in run.backends:
            if b["error"]:
                rows.append([b["run"], b["target"], _fmt(b["threads"], "g"), f"error: {b['error']}"] + ["–"] * 7)
                continue
            lat = b["latency_ms_p50"]
            base = first.setdefault(b["threads"], lat) if lat is not None else None
            rows.append([b["run"], b["target"], _fmt(b["threads"], "g"), _fmt(lat, ".1f"),
                         _fmt(b["latency_ms_p90"], ".1f"), _fmt(b["tokens_per_s"], ".0f"),
                         _fmt(b["peak_rss_mb"], ".0f"), _fmt(b["bytes"], ".2f", 1e6), _fmt(b["bleu"], ".2f"),
                         "–" if not (base and lat) else f"{base / lat:.2f}", Path(b["file"]).name])
    return Table("Backends", ["run", "target", "threads", "ms p50", "ms p90", "tokens/s", "peak RSS MB", "MB",
                              "BLEU", "× first", "from"], rows, frozenset({"run", "target", "from"}))


# ---------------------------------------------------------------------------------------------------- output

def _provenance(source: Source) -> str:
    return f"`{source.file}`, written by " + (f"`{source.command}`" if source.command else "a command not recorded")


def _provenance_html(source: Source) -> str:
    command = f"<code>{html.escape(source.command)}</code>" if source.command else "a command not recorded"
    return f"<code>{html.escape(source.file)}</code>, written by {command}"


def render_markdown(title: str, command: str | None, tables: list[Table], plots: list[Plot], notes: list[str]) -> str:
    parts = [f"# {title}", ""] + ([f"Made by `{command}`.", ""] if command else [])
    for table in tables:
        parts += [f"## {table.title}", "", table.markdown(), ""]
    parts += ["## Plots", ""]
    for plot in plots:
        parts += [f"### {plot.title}", "", f"![{plot.title}]({plot.name}.png)", "",
                  f"Data: [`{plot.name}.json`]({plot.name}.json), drawn from:", ""]
        parts += [f"- {_provenance(s)}" for s in plot.sources] + [""]
    parts += [f"- {note}" for note in notes]
    return "\n".join(parts).rstrip() + "\n"


_CSS = """body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em}
td.n{text-align:right}figure{margin:2em 0}img{max-width:100%}
figcaption{font-size:.9em;color:#444}code{background:#f4f4f4;padding:0 .2em}"""


def render_html(title: str, command: str | None, tables: list[Table], plots: list[Plot], pngs: dict[str, bytes],
                notes: list[str]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if command:
        parts.append(f"<p>Made by <code>{html.escape(command)}</code>.</p>")
    for table in tables:
        parts += [f"<h2>{html.escape(table.title)}</h2>", table.html()]
    parts.append("<h2>Plots</h2>")
    for plot in plots:
        data = base64.b64encode(pngs[plot.name]).decode("ascii")
        sources = "".join(f"<li>{_provenance_html(s)}</li>" for s in plot.sources)
        parts += [f"<figure><h3>{html.escape(plot.title)}</h3>",
                  f'<img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}">',
                  f'<figcaption>Data: <a href="{plot.name}.json"><code>{plot.name}.json</code></a>, '
                  f"drawn from:<ul>{sources}</ul></figcaption></figure>"]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def report(run_dirs: Sequence[str | Path], out: str | Path | None = None, title: str | None = None,
           command: str | None = None) -> Path:
    """Write the report of ``run_dirs`` into ``out`` (default ``<first RUN_DIR>/report``); the path of index.html.

    Each file is replaced atomically, index.html last; the PNG and JSON of a plot left out are removed, so that no
    stale figure stays beside the report. Other files in ``out`` (summary.json) are kept."""
    from eval.plots import draw

    runs = load_runs(run_dirs)
    out = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out} is a file, not a dir; choose another --out")
    title = title or "lite report: " + ", ".join(r.name for r in runs)
    plots, notes = plot_data(runs)
    tables = [stages_table(runs), backends_table(runs)]
    pngs = {p.name: draw(p) for p in plots}
    out.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        write_bytes(out / f"{plot.name}.png", pngs[plot.name])
        write_json(out / f"{plot.name}.json", {"title": plot.title, "sources": [vars(s) for s in plot.sources],
                                               "data": plot.data})
    for name in set(PLOTS) - set(pngs):
        for suffix in (".png", ".json"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)
    write_text(out / "report.md", render_markdown(title, command, tables, plots, notes))
    write_text(out / "index.html", render_html(title, command, tables, plots, pngs, notes))
    return out / "index.html"
