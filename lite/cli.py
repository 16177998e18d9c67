"""The ``lite`` command: data, train, translate, eval, macs."""
from __future__ import annotations

import argparse
import json
import logging
import sys


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


def _translate(args) -> int:
    from lite.translate import TorchTranslator, read_stdin_lines

    translator = TorchTranslator(args.checkpoint, data=args.data, options=_generation(args))
    for line in translator.translate(read_stdin_lines()):
        print(line)
    return 0


def _eval(args) -> int:
    from lite.evaluate import evaluate

    result = evaluate(args.checkpoint, args.split, data=args.data, options=_generation(args), out_dir=args.out)
    print(json.dumps(result, indent=2) if args.json else
          f"{args.split}: BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}\n"
          f"  {result['bleu_signature']}\n  {result['chrf_signature']}\n  hypotheses: {result['hypotheses']}")
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="fairseq checkpoint (.pt)")
    p.add_argument("--data", help="prepared data dir (default: the one the checkpoint was trained on)")
    p.add_argument("--backend", choices=["torch"], default="torch")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-len-a", type=float, default=1.2, help="max output length = a * source length + b")
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch")


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
    p.set_defaults(func=_translate)

    p = sub.add_parser("eval", help="BLEU and chrF (sacrebleu) on a split of the prepared data")
    _add_generation_args(p)
    p.add_argument("--split", required=True, help="a split of the data dir, e.g. test2016")
    p.add_argument("--out", help="where hypotheses and scores go (default: <checkpoint dir>/eval)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_eval)

    from eval.macs import register_cli as register_macs

    register_macs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    from lite.checkpoint import CheckpointError
    from lite.data import DataError
    from lite.train import ConfigError

    try:
        return args.func(args)
    except (DataError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"lite {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
