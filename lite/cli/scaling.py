"""``lite scaling``: encoder and decoder-step latency vs length, per architecture, or with ``--train`` the CPU time of
a training step (eval/scaling.py).

    lite scaling --arch transformer_100m,linear_100m --lengths 16,64,256,512 [--threads 1] [--repeat 20] [--json]
    lite scaling --arch transformer_100m,lsra_100m --lengths 15 --train [--tokens 3360] [--repeat 3]
"""
from __future__ import annotations

import json

from lite.cli.types import positive_int


def _ints(text: str) -> list[int]:
    return [positive_int(x) for x in text.split(",")]


def _run(args) -> int:
    from eval.scaling import markdown, measure, measure_training, to_json, training_markdown

    archs = args.arch.split(",")
    if args.train:
        points = [p for arch in archs
                  for p in measure_training(arch, args.lengths, args.tokens, args.repeat or 3, args.threads)]
    else:
        points = [p for arch in archs for p in measure(arch, args.lengths, args.repeat or 20, args.threads)]
    table = training_markdown if args.train else markdown
    print(json.dumps(to_json(points), indent=2) if args.json else table(points, args.threads))
    return 0


def register(sub) -> None:
    p = sub.add_parser("scaling", help="encoder and decoder-step latency vs length, per architecture (ONNX Runtime); "
                                       "--train: CPU time of a training step")
    p.add_argument("--arch", required=True, help="comma-separated architectures, e.g. transformer_100m,linear_100m")
    p.add_argument("--lengths", type=_ints, default=[16, 64, 256, 512], metavar="L,L,...",
                   help="source tokens, and target tokens before the timed step (default 16,64,256,512)")
    p.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime (or PyTorch) threads (default 1)")
    p.add_argument("--repeat", type=positive_int, help="timed runs per figure, the median shown (default 20, --train 3)")
    p.add_argument("--train", action="store_true",
                   help="CPU seconds of a training step (forward + backward, PyTorch) instead of ONNX latency")
    p.add_argument("--tokens", type=positive_int, default=3360,
                   help="--train: target tokens a batch, tokens // L sentences (default 3360, a multi30k_100m batch)")
    p.add_argument("--json", action="store_true", help="print the points as JSON")
    p.set_defaults(func=_run)
