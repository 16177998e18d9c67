"""The report's figures (``eval/report.py`` builds their data): matplotlib, Agg, no pyplot state; each is a PNG.

Every function takes a ``Plot.data`` dict as ``eval.report.plot_data`` writes it (the same dict goes to
``<plot>.json``), so a figure can be redrawn from its JSON alone: ``draw(Plot(name, title, json["data"], []))``.
"""
from __future__ import annotations

import io
from itertools import cycle

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter
from matplotlib.transforms import Bbox

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LOG_RATIO = 10  # an axis whose values span this factor or more is drawn on a log scale
OFFSETS = ((5, 4), (-5, 4), (5, -4), (-5, -4), (8, 0), (-8, 0), (5, 13), (-5, 13), (5, -13), (-5, -13))  # points


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _scale(ax, axis: str, values) -> None:
    values = [v for v in values if v and v > 0]
    if values and max(values) / min(values) >= LOG_RATIO:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        which = ax.xaxis if axis == "x" else ax.yaxis  # plain numbers (40, 100, 400), not 4×10^1
        which.set_major_formatter(LogFormatter())
        which.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))


def _legend(ax, handles=None, title: str | None = None) -> None:
    """Outside the axes, on the right: it never hides a point."""
    kwargs = {"handles": handles} if handles is not None else {}
    ax.legend(**kwargs, title=title, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small",
              title_fontsize="small", frameon=False)


def _area(a, b) -> float:
    """The area two display boxes share."""
    w, h = min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0) * max(h, 0)


def _label_points(fig: Figure, ax, items: list[tuple[float, float, str]]) -> None:
    """Label each (x, y, text) beside its point, inside the axes, where it hides no other label or point: the first
    free place of OFFSETS, else the one that hides least. Labels stay out of the layout (it is settled first)."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = ax.transData.transform([(x, y) for x, y, _ in items])
    taken = [Bbox.from_extents(x - 5, y - 5, x + 5, y + 5) for x, y in points]  # the markers (s=60: ~11 px wide)
    for x, y, text in items:
        best = None
        for dx, dy in OFFSETS:
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                                ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top" if dy < 0 else
                                "center", in_layout=False)
            box = label.get_window_extent(renderer)
            cost = sum(_area(box, t) for t in taken) + box.width * box.height - _area(box, frame)
            if best is not None:
                (best[0] if cost < best[1] else label).remove()
            if best is None or cost < best[1]:
                best = (label, cost, box)
            if cost == 0:
                break
        taken.append(best[2])


def _styles(keys) -> dict:
    """A color per key (first-seen order)."""
    return dict(zip(dict.fromkeys(keys), cycle(COLORS)))


def bleu_vs_macs(title: str, data: dict) -> bytes:
    points, frontier = data["points"], data["frontier"]
    several_runs = len({p["run"] for p in points}) > 1
    color = _styles(p["family"] or "?" for p in points)
    marker = dict(zip(dict.fromkeys(p["budget"] or "no budget" for p in points), cycle(MARKERS)))
    fig, ax = _figure()
    for p in points:
        ax.scatter(p["macs"] / 1e6, p["bleu"], color=color[p["family"] or "?"],
                   marker=marker[p["budget"] or "no budget"], s=60, zorder=3)
    ax.plot([p["macs"] / 1e6 for p in frontier], [p["bleu"] for p in frontier], "--", color="black",
            drawstyle="steps-post", linewidth=1, zorder=2)
    ax.margins(0.08)
    _scale(ax, "x", [p["macs"] for p in points])
    ax.set_xlabel("MACs (millions)")
    ax.set_ylabel("BLEU")
    ax.set_title(title)
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=f) for f, c in color.items()]
    handles += [Line2D([], [], color="gray", marker=m, linestyle="", label=b) for b, m in marker.items()]
    handles.append(Line2D([], [], color="black", linestyle="--", label="Pareto frontier"))
    _legend(ax, handles, "family / budget")
    on_frontier = {(p["run"], p["stage"]) for p in frontier}  # labelled first: they get the best places
    _label_points(fig, ax, [(p["macs"] / 1e6, p["bleu"], f"{p['run']}:{p['stage']}" if several_runs else p["stage"])
                            for p in sorted(points, key=lambda p: (p["run"], p["stage"]) not in on_frontier)])
    return _png(fig)


def bleu_vs_latency(title: str, data: dict) -> bytes:
    points = data["points"]
    several_runs = len({p["run"] for p in points}) > 1
    color = _styles((p["run"], p["target"]) for p in points)  # a color per backend, a marker per thread count
    marker = dict(zip(dict.fromkeys(p["threads"] for p in points), cycle(MARKERS)))
    fig, ax = _figure()
    for p in points:
        label = f"{p['run']} · {p['target']} ({p['threads']} thr)" if several_runs else \
            f"{p['target']} ({p['threads']} thr)"
        ax.scatter(p["latency_ms_p50"], p["bleu"], color=color[p["run"], p["target"]], marker=marker[p["threads"]],
                   s=60, label=label, zorder=3, alpha=0.85, edgecolors="white")
    _scale(ax, "x", [p["latency_ms_p50"] for p in points])
    ax.set_xlabel("latency per sentence, p50, batch 1 (ms)")
    ax.set_ylabel("BLEU")
    ax.set_title(title)
    _legend(ax, title="backend (threads)")
    return _png(fig)


def size_by_stage(title: str, data: dict) -> bytes:
    bars = data["bars"]
    stages = list(dict.fromkeys(b["stage"] for b in bars))
    runs = list(dict.fromkeys(b["run"] for b in bars))
    color = _styles(runs)
    width = 0.8 / len(runs)
    fig, ax = _figure()
    for i, run in enumerate(runs):
        mine = {b["stage"]: b["bytes"] for b in bars if b["run"] == run}
        xs = [k + (i - (len(runs) - 1) / 2) * width for k, s in enumerate(stages) if s in mine]
        heights = [mine[s] / 1e6 for s in stages if s in mine]
        drawn = ax.bar(xs, heights, width, color=color[run], label=run, zorder=3)
        ax.bar_label(drawn, fmt="%.2f", fontsize=8, padding=2)
    long = sum(map(len, stages)) > 60 or max(map(len, stages)) > 12  # names that would run into each other
    ax.set_xticks(range(len(stages)), stages, rotation=30 if long else 0, ha="right" if long else "center")
    ax.margins(y=0.15)
    ax.set_xlabel("compression stage")
    ax.set_ylabel("deployable artifact (MB)")
    ax.set_title(title)
    _legend(ax, title="run")
    return _png(fig)


def latency_vs_length(title: str, data: dict) -> bytes:
    series = data["series"]
    several_runs = len({s["run"] for s in series}) > 1
    color = _styles((s["run"], s["target"], s["threads"]) for s in series)
    fig, ax = _figure()
    for s in series:
        c = color[(s["run"], s["target"], s["threads"])]
        label = f"{s['run']} · {s['target']}" if several_runs else s["target"]
        ax.scatter([w for w, _ in s["latency_by_length"]], [ms for _, ms in s["latency_by_length"]], color=c, s=10,
                   alpha=0.35, zorder=2)
        ax.plot([m["median_words"] for m in s["medians"]], [m["median_ms"] for m in s["medians"]],
                "-o", color=c, markersize=4, label=f"{label} ({s['threads']} thr)", zorder=3)
    _scale(ax, "y", [ms for s in series for _, ms in s["latency_by_length"]])
    ax.set_xlabel("source words")
    ax.set_ylabel("latency per sentence, batch 1 (ms)")
    ax.set_title(f"{title}\n(dots: sentences; line: median per {data['bucket_words']} words)", fontsize=11)
    _legend(ax, title="backend (threads)")
    return _png(fig)


def bleu_vs_bytes(title: str, data: dict) -> bytes:
    points = data["points"]
    color = _styles(p["quantization"] for p in points)
    fig, ax = _figure()
    for p in points:
        ax.scatter(p["weight_bytes"] / 1e6, p["bleu"], color=color[p["quantization"]], s=60, zorder=3)
    ax.margins(0.08)
    _scale(ax, "x", [p["weight_bytes"] for p in points])
    ax.set_xlabel("non-embedding weights on disk (MB)")
    ax.set_ylabel("BLEU")
    ax.set_title(title)
    _legend(ax, [Line2D([], [], color=c, marker="o", linestyle="", label=q) for q, c in color.items()], "weights")
    _label_points(fig, ax, [(p["weight_bytes"] / 1e6, p["bleu"], p["stage"]) for p in points])
    return _png(fig)


DRAW = {"bleu_vs_macs": bleu_vs_macs, "bleu_vs_bytes": bleu_vs_bytes, "bleu_vs_latency": bleu_vs_latency, "size_by_stage": size_by_stage,
        "latency_vs_length": latency_vs_length}


def draw(plot) -> bytes:
    """The PNG of an ``eval.report.Plot``."""
    return DRAW[plot.name](plot.title, plot.data)
