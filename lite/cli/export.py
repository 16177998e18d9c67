"""``lite export CHECKPOINT --out DIR``."""
from __future__ import annotations


def _run(args) -> int:
    from export.exporter import export

    print(export(args.checkpoint, args.out, data=args.data, slim=args.slim, ort=args.ort, force=args.force))
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="ONNX encoder + decoder-step graphs, validated against PyTorch")
    p.add_argument("checkpoint", help="fairseq checkpoint (.pt)")
    p.add_argument("--out", required=True, help="the model dir to write")
    p.add_argument("--data", help="prepared data dir (default: the one the checkpoint was trained on)")
    p.add_argument("--slim", action="store_true", help="clean the graphs up with onnxslim (validated again)")
    p.add_argument("--ort", action="store_true", help="also write ORT-format graphs for ONNX Runtime Mobile")
    p.add_argument("--force", action="store_true", help="replace an existing model dir")
    p.set_defaults(func=_run)
