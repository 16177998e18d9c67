"""``lite report``: one static HTML page and Markdown with plots, from pipeline and bench runs (``eval/report.py``)."""
from __future__ import annotations

import argparse
import shlex


def _run(args) -> int:
    from eval.report import report

    command = shlex.join(["lite", "report", *args.run_dirs] + (["--out", args.out] if args.out else [])
                         + (["--title", args.title] if args.title else []))
    print(report(args.run_dirs, args.out, args.title, command=command))
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="one HTML page and Markdown with plots, from pipeline and bench runs",
                       description=__import__("eval.report", fromlist=["_"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a dir with report/summary.json (lite pipeline) and/or bench.json (lite bench --out)")
    p.add_argument("--out", help="the report dir (default: <first RUN_DIR>/report)")
    p.add_argument("--title", help="the page title (default: the run names)")
    p.set_defaults(func=_run)
