"""``lite bench``: latency, throughput, memory, size and BLEU of every backend in one run (``eval/bench.py``)."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import eval.bench as library
from lite.cli.types import non_negative_int, positive_int


def _threads(text: str) -> tuple[int, ...]:
    """'1,all' -> (1, cpu count)."""
    values = []
    for item in text.split(","):
        values.append(os.cpu_count() or 1 if item.strip() == "all" else positive_int(item.strip()))
    return tuple(dict.fromkeys(values))


def _run(args) -> int:
    from tqdm import tqdm

    from lite.errors import LiteError
    from lite.files import write_json
    from lite.text import read_lines

    Target = library.Target
    targets = [Target("torch", p, data=args.data) for p in args.checkpoint]
    targets += [Target("onnx", p, data=args.data) for p in args.model]
    targets += [Target("ort", p, data=args.data) for p in args.ort_model]
    targets += [Target("ct2", p, quantization=q, data=args.data) for p in args.ct2 for q in args.ct2_quantization]
    targets = library.distinct_labels(targets)
    if args.shortlist:  # each onnx and ct2 target again, with the vocabulary map
        targets += [replace(t, shortlist=args.shortlist) for t in targets if t.backend in ("onnx", "ct2")]
    if args.ort_search:  # each onnx target again, its search in ONNX Runtime's BeamSearch op
        targets += library.with_ort_search(targets)
    if not targets:
        raise LiteError("nothing to measure: give --checkpoint, --model, --ort-model or --ct2")
    config = library.BenchConfig(sentences=args.sentences, threads=args.threads, repeat=args.repeat, warmup=args.warmup,
                         batch=args.batch, beam=args.beam)
    sources = read_lines(args.source)
    references = read_lines(args.reference) if args.reference else None
    with tqdm(total=len(targets) * len(config.threads) * config.repeat, desc="bench", unit="run") as bar:
        document = library.bench(targets, sources, references, config, progress=lambda *_: bar.update())
    if args.out:
        write_json(args.out, document)
    print(json.dumps(document, indent=2) if args.json else library.markdown(document))
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency, throughput, memory, size and BLEU of every backend, in one run",
                       description=library.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="source sentences, one a line (e.g. <data>/raw/test2016.de)")
    p.add_argument("--reference", help="their references, for BLEU per backend")
    p.add_argument("--checkpoint", action="append", default=[], help="torch: a fairseq checkpoint (repeatable)")
    p.add_argument("--model", action="append", default=[], help="onnx: a model dir, fp32 or int8 (repeatable)")
    p.add_argument("--ort-model", action="append", default=[], help="ort: a model dir's ORT-format graphs")
    p.add_argument("--ct2", action="append", default=[], help="ct2: a plain-Transformer checkpoint (repeatable)")
    p.add_argument("--ct2-quantization", type=lambda t: tuple(q.strip() for q in t.split(",")),
                   default=("int8", "float32"), help="CTranslate2 types to measure (default: int8,float32)")
    p.add_argument("--data", help="prepared data dir (default: the one each model names)")
    p.add_argument("--shortlist", help="vocabulary map (`lite data shortlist`): also measure every onnx and ct2 "
                                       "target with it")
    p.add_argument("--ort-search", action="store_true", help="also measure every onnx target whose decoder fits it "
                   "with the whole search in ONNX Runtime's BeamSearch op (the Transformer family; the others are "
                   "named in a warning)")
    p.add_argument("--sentences", type=positive_int, default=300, help="the first N non-empty lines")
    p.add_argument("--threads", type=_threads, default=(1,), help="thread counts, e.g. 1,all (default: 1)")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="rounds over all targets, every other one in reverse order; figures are the median")
    p.add_argument("--warmup", type=non_negative_int, default=5, help="sentences translated before timing")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size of the throughput run")
    p.add_argument("--beam", type=positive_int, default=4)
    p.add_argument("--out", help="write the JSON document here")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    p.set_defaults(func=_run)
