"""The ``lite`` command: data, train, translate, eval, macs, export, compress."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time


def _data(args) -> int:
    if args.action == "prepare":
        from lite.data import prepare

        prepare(args.source, args.out, args.src, args.tgt, args.vocab_size, args.force)
    elif args.action == "download":
        from lite.download import download

        download(args.name, args.out)
    else:
        from lite.corpus import write_default_corpus

        print(write_default_corpus(args.out))
    return 0


def _train(args) -> int:
    from lite.train import load_config, train

    return train(load_config(args.config, args.overrides), args.max_minutes, args.finetune_from)


def _generation(args):
    from lite.translate import GenerationOptions

    return GenerationOptions(beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
                             batch_size=args.batch_size)


def _model_path(args) -> str:
    """--checkpoint for the torch backend, --model (an exported dir) for onnx."""
    path = args.checkpoint if args.backend == "torch" else args.model
    if not path:
        flag = "--checkpoint CHECKPOINT" if args.backend == "torch" else "--model DIR (made by `lite export`)"
        raise SystemExit(f"lite {args.command}: --backend {args.backend} needs {flag}")
    return path


def _translate(args) -> int:
    from lite.evaluate import open_translator
    from lite.translate import read_stdin_lines

    translator, _ = open_translator(args.backend, _model_path(args), args.data, _generation(args), args.threads)
    lines = read_stdin_lines()
    start = time.perf_counter()
    outputs = translator.translate(lines)
    seconds = time.perf_counter() - start
    for line in outputs:
        print(line)
    if args.timing:
        count = sum(1 for line in lines if line.strip())
        print(f"{args.backend}: {count} sentences in {seconds:.2f} s, {1000 * seconds / max(count, 1):.1f} ms/sentence "
              f"(beam {args.beam}, batch {args.batch_size}, {args.threads} thread(s))", file=sys.stderr)
    return 0


def _eval(args) -> int:
    from lite.evaluate import evaluate

    result = evaluate(_model_path(args), args.split, data=args.data, options=_generation(args), out_dir=args.out,
                      backend=args.backend, threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else
          f"{args.split}: BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}  ({args.backend}, "
          f"{result['ms_per_sentence']:.1f} ms/sentence)\n"
          f"  {result['bleu_signature']}\n  {result['chrf_signature']}\n  hypotheses: {result['hypotheses']}")
    return 0


def _export(args) -> int:
    from export.exporter import export

    out = export(args.checkpoint, args.out, data=args.data, slim=args.slim, ort=args.ort, force=args.force)
    print(out)
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="torch: fairseq on a checkpoint; onnx: ONNX Runtime on an exported model dir")
    p.add_argument("--checkpoint", help="fairseq checkpoint (.pt), for --backend torch")
    p.add_argument("--model", help="model dir made by `lite export`, for --backend onnx")
    p.add_argument("--data", help="prepared data dir (default: the one the model was trained on)")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-len-a", type=float, default=1.2, help="max output length = a * source length + b")
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (onnx backend)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare, download or generate parallel text")
    data_sub = data.add_subparsers(dest="action", required=True)
    p = data_sub.add_parser("prepare", help="validate, sentencepiece, binarize into a fairseq data dir")
    p.add_argument("--from", dest="source", required=True, help="dir with train/valid/<test>.{src,tgt}")
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=8000, help="joint sentencepiece vocabulary (an upper bound)")
    p.add_argument("--force", action="store_true", help="replace an out dir that holds a different corpus")
    p = data_sub.add_parser("download", help="download a public corpus (needs internet)")
    p.add_argument("name", choices=["multi30k", "iwslt14"])
    p.add_argument("--out", required=True)
    p = data_sub.add_parser("embedded", help="write the embedded default German->English corpus")
    p.add_argument("--out", required=True)
    data.set_defaults(func=_data)

    p = sub.add_parser("train", help="fairseq-train from a YAML config")
    p.add_argument("config", help="configs/models/<family>/<preset>.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    p.add_argument("--max-minutes", type=float, help="stop (and save) after this much training time in total")
    p.add_argument("--finetune-from", help="start from this checkpoint's weights (fresh optimizer)")
    p.set_defaults(func=_train)

    p = sub.add_parser("translate", help="translate stdin to stdout, one sentence per line")
    _add_generation_args(p)
    p.add_argument("--timing", action="store_true", help="print ms/sentence to stderr")
    p.set_defaults(func=_translate)

    p = sub.add_parser("eval", help="BLEU and chrF (sacrebleu) on a split of the prepared data")
    _add_generation_args(p)
    p.add_argument("--split", required=True, help="a split of the data dir, e.g. test2016")
    p.add_argument("--out", help="where results go (default: <checkpoint dir>/eval; onnx: <model dir>.eval)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="ONNX encoder + decoder-step graphs, validated against PyTorch")
    p.add_argument("checkpoint", help="fairseq checkpoint (.pt)")
    p.add_argument("--out", required=True, help="the model dir to write")
    p.add_argument("--data", help="prepared data dir (default: the one the checkpoint was trained on)")
    p.add_argument("--slim", action="store_true", help="clean the graphs up with onnxslim (validated again)")
    p.add_argument("--ort", action="store_true", help="also write ORT-format graphs for ONNX Runtime Mobile")
    p.add_argument("--force", action="store_true", help="replace an existing model dir")
    p.set_defaults(func=_export)

    from compress.prune import register_cli as register_compress
    from compress.quantize import add_quantize_parser
    from compress.report import add_report_parser
    from eval.macs import register_cli as register_macs

    compress_actions = register_compress(sub)
    add_quantize_parser(compress_actions)
    add_report_parser(compress_actions)

    register_macs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwind: children are stopped too
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    from lite.checkpoint import CheckpointError
    from lite.data import DataError
    from lite.train import ConfigError
    from export.exporter import ExportError
    from export.runtime import ModelDirError
    from export.validate import ExportMismatch

    try:
        return args.func(args)
    except (DataError, ConfigError, CheckpointError, ExportError, ExportMismatch, ModelDirError,
            FileNotFoundError) as e:
        print(f"lite {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
