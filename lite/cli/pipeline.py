"""``lite pipeline CONFIG``: the whole job, resumable (``lite/pipeline.py``)."""
from __future__ import annotations

import json
from pathlib import Path


def _run(args) -> int:
    from tqdm import tqdm

    from lite.pipeline import load_pipeline, plan, run_pipeline, select_models

    config = load_pipeline(args.config)
    if args.models:
        config = select_models(config, args.models)
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    with tqdm(total=len(plan(config, run_dir)), desc=config.name, unit="stage") as bar:
        def progress(stage, state: str) -> None:
            bar.write(f"[{stage.name}] {state}" + (f": {stage.command}" if state == "running" else ""))
            if state != "running":
                bar.update()

        run_pipeline(config, run_dir, progress)
    print(table(json.loads((run_dir / "report" / "summary.json").read_text())))
    print(f"report: {run_dir / 'report' / 'index.html'}  (manifest: {run_dir / 'manifest.json'})")
    return 0


def table(summary: dict) -> str:
    """The summary as two Markdown tables: compression stages, backends."""
    rows = ["| stage | BLEU | MACs | params (no emb.) | MB |", "|---|---:|---:|---:|---:|"]
    for name, s in summary["stages"].items():
        rows.append(f"| {name} | {s['bleu']} | {s['macs'] / 1e6:.2f}M | {s['params_no_embed']:,} | "
                    f"{s['bytes'] / 1e6:.2f} |")
    rows += ["", "| backend | ms/sentence p50 (p90) | tokens/s | peak RSS MB | BLEU | MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, b in summary["backends"].items():
        rows.append(f"| {name} | {b['latency_ms_p50']:.1f} ({b['latency_ms_p90']:.1f}) | {b['tokens_per_s']:.0f} | "
                    f"{b['peak_rss_mb']:.0f} | {b['bleu']} | {b['bytes'] / 1e6:.2f} |")
    return "\n".join(rows)


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="data -> train -> prune -> export -> int8 -> eval -> bench -> report")
    p.add_argument("config", help="configs/pipelines/<name>.yaml")
    p.add_argument("--run-dir", help="where everything goes (default: runs/<name>)")
    p.add_argument("--models", type=lambda s: [n for n in s.split(",") if n],
                   help="run only these models of the config, comma-separated (e.g. lsra,transformer)")
    p.set_defaults(func=_run)
