"""``lite scaling``: encoder and decoder-step latency vs length, per architecture (eval/scaling.py).

    lite scaling --arch transformer_100m,linear_100m --lengths 16,64,256,512 [--threads 1] [--repeat 20] [--json]
"""
from __future__ import annotations

import json

from lite.cli.types import positive_int


def _ints(text: str) -> list[int]:
    return [positive_int(x) for x in text.split(",")]


def _run(args) -> int:
    from eval.scaling import markdown, measure, to_json

    points = [p for arch in args.arch.split(",") for p in measure(arch, args.lengths, args.repeat, args.threads)]
    print(json.dumps(to_json(points), indent=2) if args.json else markdown(points, args.threads))
    return 0


def register(sub) -> None:
    p = sub.add_parser("scaling", help="encoder and decoder-step latency vs length, per architecture (ONNX Runtime)")
    p.add_argument("--arch", required=True, help="comma-separated architectures, e.g. transformer_100m,linear_100m")
    p.add_argument("--lengths", type=_ints, default=[16, 64, 256, 512], metavar="L,L,...",
                   help="source tokens, and target tokens before the timed step (default 16,64,256,512)")
    p.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--repeat", type=positive_int, default=20, help="timed runs per figure; the median is shown")
    p.add_argument("--json", action="store_true", help="print the points as JSON")
    p.set_defaults(func=_run)
