"""``lite train CONFIG [key=value ...]``."""
from __future__ import annotations

from lite.cli.types import positive_float


def _run(args) -> int:
    from lite.train import load_config, train

    return train(load_config(args.config, args.overrides), args.max_minutes, args.finetune_from,
                 args.max_cpu_minutes)


def register(sub) -> None:
    p = sub.add_parser("train", help="fairseq-train from a YAML config")
    p.add_argument("config", help="configs/models/<family>/<preset>.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    p.add_argument("--max-minutes", type=positive_float, help="stop (and save) after this much training time in total")
    p.add_argument("--max-cpu-minutes", type=positive_float,
                   help="stop after this much CPU time of the training processes, in total (equal-compute runs)")
    p.add_argument("--finetune-from", help="start from this checkpoint's weights (fresh optimizer)")
    p.set_defaults(func=_run)
