"""The ``lite`` command: data, train, translate, eval, export, compress, macs, bench, scaling, report, pipeline.

All argument parsing and printing lives in this package, one module per command group; the libraries take typed
options and raise ``lite.errors.LiteError``. ``main`` prints such an error as one line and exits with its code
(2: bad input, 3: a criterion not met); argparse refuses a bad argument value with exit code 2 as well.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from lite.cli import bench, compress, data, export, macs, pipeline, report, scaling, train, translate
from lite.errors import LiteError

GROUPS = (data, train, translate, export, compress, macs, bench, scaling, report, pipeline)


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (and exit code 2), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwind: children are stopped too
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, ("lite", args.command, getattr(args, "action", None))))
    try:
        return args.func(args)
    except LiteError as e:
        print(f"{command}: {'error: ' if e.exit_code == 2 else ''}{e}", file=sys.stderr)
        return e.exit_code
