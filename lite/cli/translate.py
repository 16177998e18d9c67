"""``lite translate`` (stdin to stdout) and ``lite eval`` (BLEU and chrF on a split), on either backend."""
from __future__ import annotations

import argparse
import json
import sys
import time

from lite.cli.types import non_negative_float, non_negative_int, positive_int
from lite.errors import LiteError


def _options(args):
    from export.search import SearchOptions

    return SearchOptions(beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b)


def _model_path(args) -> str:
    """--checkpoint for the torch backend, --model (an exported dir) for onnx and ort."""
    path = args.checkpoint if args.backend == "torch" else args.model
    if not path:
        flag = "--checkpoint CHECKPOINT" if args.backend == "torch" else "--model DIR (made by `lite export`)"
        raise LiteError(f"--backend {args.backend} needs {flag}")
    return path


def _translate(args) -> int:
    from lite.text import read_stream
    from lite.translate import open_translator, translate_lines

    lines = read_stream(sys.stdin.buffer, "<stdin>", keep_going=True)  # a line that is not UTF-8 reads as ""
    translator, _ = open_translator(args.backend, _model_path(args), args.data, _options(args), args.threads,
                                    args.batch_size, args.shortlist, args.search)
    start = time.perf_counter()
    outputs = translate_lines(translator, lines, "<stdin>")
    seconds = time.perf_counter() - start
    for line in outputs:
        print(line)
    if args.timing:
        count = sum(1 for line in lines if line.strip())
        print(f"{args.backend}: {count} sentences in {seconds:.2f} s, {1000 * seconds / max(count, 1):.1f} ms/sentence "
              f"(beam {args.beam}, batch {args.batch_size}, {args.threads} thread(s))", file=sys.stderr)
    return 0


def _eval(args) -> int:
    from eval.evaluate import evaluate

    result = evaluate(_model_path(args), args.split, data=args.data, options=_options(args), out_dir=args.out,
                      backend=args.backend, threads=args.threads, batch_size=args.batch_size, shortlist=args.shortlist,
                      search=args.search)
    print(json.dumps(result, indent=2) if args.json else
          f"{args.split}: BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}  ({args.backend}, {args.search} search, "
          f"{result['ms_per_sentence']:.1f} ms/sentence)\n"
          f"  {result['bleu_signature']}\n  {result['chrf_signature']}\n  hypotheses: {result['hypotheses']}")
    return 0


def _add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["torch", "onnx", "ort"], default="torch",
                   help="torch: fairseq on a checkpoint; onnx: ONNX Runtime on an exported model dir; ort: its "
                        "ORT-format graphs (lite export --ort)")
    p.add_argument("--checkpoint", help="fairseq checkpoint (.pt), for --backend torch")
    p.add_argument("--model", help="model dir made by `lite export`, for --backend onnx/ort")
    p.add_argument("--data", help="prepared data dir (default: the one the model was trained on)")
    p.add_argument("--beam", type=positive_int, default=4)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-len-a", type=non_negative_float, default=1.2,
                   help="max output length = a * source length + b")
    p.add_argument("--max-len-b", type=non_negative_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=64, help="sentences per batch")
    p.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime intra-op threads (onnx backend)")
    p.add_argument("--shortlist", help="vocabulary map (`lite data shortlist`): score only the target tokens the "
                                       "batch's source words map to (onnx backend)")
    p.add_argument("--search", choices=["fairseq", "ort"], default="fairseq",
                   help="fairseq: fairseq's beam search, step for step (numpy between ONNX Runtime calls); ort: the "
                        "whole search in one call per batch, ONNX Runtime's BeamSearch op (onnx backend, Transformer "
                        "family; no --shortlist)")


def register(sub) -> None:
    p = sub.add_parser("translate", help="translate stdin to stdout, one sentence per line; a line that is not UTF-8 "
                                         "or longer than the model takes gives an empty line (and a warning)")
    _add_search_args(p)
    p.add_argument("--timing", action="store_true", help="print ms/sentence to stderr")
    p.set_defaults(func=_translate)

    p = sub.add_parser("eval", help="BLEU and chrF (sacrebleu) on a split of the prepared data")
    _add_search_args(p)
    p.add_argument("--split", required=True, help="a split of the data dir, e.g. test2016")
    p.add_argument("--out", help="where results go (default: <checkpoint dir>/eval; onnx: <model dir>.eval)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_eval)
