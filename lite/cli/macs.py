"""``lite macs``: Mult-Adds and parameters of a model, the embed dim that fits a budget, the README table.

    lite macs --arch lsra_wmt_200 [--src-len 30 --tgt-len 30 --vocab-size 10000] [--json]
    lite macs --checkpoint runs/x/checkpoints/checkpoint_best.pt [--data DIR]
    lite macs --family lsra --budget 100M      # the largest embed dim whose preset fits the budget
    lite macs --markdown                        # the README table of every preset
    lite macs --mechanisms [--run-dir runs/multi30k_100m ...] [--eval EVAL.json ...] [--eval-2000 EVAL.json ...]
                           [--bench bench.json] [--record RECORD.json]   # the README's mixers table

MACs follow the Lite Transformer paper's protocol (eval/macs.py): source + target tokens, batch 1, the full
teacher-forced decoder pass, embeddings and output projection excluded. Decode MACs: one sentence translated
with incremental decoding at beam 1 and 4, output projection included.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from eval.macs_protocol import SRC_LEN, TGT_LEN, VOCAB_SIZE
from lite.cli.types import budget, positive_int


def _run(args) -> int:
    from eval.macs import MacsError

    if args.budget is not None and args.family is None:
        raise MacsError("--budget goes with --family (e.g. --family lsra --budget 100M)")
    if (args.run_dir or args.eval or args.eval_2000 or args.bench or args.record) and not args.mechanisms:
        raise MacsError("--run-dir, --eval, --eval-2000, --bench and --record go with --mechanisms")
    if args.mechanisms:
        from eval.mechanisms import markdown_table as mechanisms_table

        print(mechanisms_table(args.run_dir or (), args.bench, args.eval or (), args.record, args.eval_2000 or ()))
    elif args.markdown:
        from eval.macs_table import markdown_table

        print(markdown_table(src_len=args.src_len, tgt_len=args.tgt_len, vocab_size=args.vocab_size))
    elif args.family is not None:
        _propose(args)
    else:
        _measure(args)
    return 0


def _propose(args) -> None:
    from eval.budget import propose_dim
    from eval.macs import MacsError
    from eval.macs_table import millions

    if args.budget is None:
        raise MacsError(f"--family {args.family} needs --budget (e.g. --budget 100M)")
    dim, macs = propose_dim(args.family, args.budget, args.src_len, args.tgt_len)
    if args.json:
        print(json.dumps({"family": args.family, "budget": args.budget, "embed_dim": dim, "macs": macs,
                          "fraction_of_budget": round(macs / args.budget, 4)}))
    else:
        print(f"{args.family} at --budget {args.budget / 1e6:g}M: embed dim {dim} ({millions(macs)} MACs, "
              f"{macs / args.budget:.1%} of the budget)")


def _measure(args) -> None:
    from eval.macs import measure
    from eval.macs_table import millions

    if args.checkpoint is not None:
        from lite.checkpoint import load_model

        model, _ = load_model(args.checkpoint, args.data)
        arch = getattr(getattr(model, "args", None), "arch", None) or str(args.checkpoint)
    else:
        from lite.models.factory import build_arch

        model, arch = build_arch(args.arch, args.vocab_size), args.arch
    c = measure(model, arch, args.src_len, args.tgt_len)
    if args.json:
        print(json.dumps(asdict(c)))
        return
    print(f"{c.arch}: source {c.src_len}, target {c.tgt_len} tokens, vocabulary {c.vocab_size}\n"
          f"  MACs (paper protocol): {millions(c.macs)}  (encoder {millions(c.encoder_macs)}, "
          f"decoder {millions(c.decoder_macs)})\n"
          f"  params: {millions(c.params, 2)} total, {millions(c.params_no_embed, 2)} without embeddings  "
          f"({c.bytes_fp32 / 2**20:.1f} MiB fp32, {c.bytes_int8 / 2**20:.1f} MiB int8)\n"
          f"  decode MACs, one sentence (incremental, output projection included): "
          f"beam 1 {millions(c.decode_macs_beam1)}, beam 4 {millions(c.decode_macs_beam4)}")


def register(sub) -> None:
    p = sub.add_parser("macs", help="Mult-Adds and parameters of a model; budget presets", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", help="a registered lite_transformer architecture")
    what.add_argument("--checkpoint", help="a fairseq checkpoint (.pt)")
    what.add_argument("--family", help="propose the largest embed dim of this family within --budget "
                                       "(lsra, transformer, ...: lite/models/budgets.py)")
    what.add_argument("--markdown", action="store_true", help="print the Markdown table of every preset")
    what.add_argument("--mechanisms", action="store_true",
                      help="print the Markdown table of token mixers: paper, encoder/decoder, decoding state, "
                           "MACs of the 100M preset (+ BLEU, int8 latency and its speed-up over fairseq from "
                           "--run-dir)")
    p.add_argument("--run-dir", action="append", help="with --mechanisms: a `lite pipeline` run dir (its "
                                                      "report/summary.json); repeat for several runs, the last "
                                                      "one given wins for a preset in more than one")
    p.add_argument("--eval", action="append", help="with --mechanisms: a `lite eval --checkpoint` result (its JSON) "
                                                   "whose BLEU is its preset's; repeat for several, after --run-dir")
    p.add_argument("--eval-2000", action="append",
                   help="with --mechanisms: a `lite eval --checkpoint` result of a checkpoint at 2,000 updates (a "
                        "run's checkpoint_E_2000.pt): its preset's BLEU at 2,000 updates; repeat for several")
    p.add_argument("--bench", help="with --mechanisms: a `lite bench --out` file whose int8 ONNX model dirs (one "
                                    "per preset) give every latency, measured in one run, and the speed-up over "
                                    "fairseq where it timed the checkpoint a dir was exported from (--checkpoint)")
    p.add_argument("--record", help="with --mechanisms: a JSON file that keeps the table's figures with the run "
                                     "each came from (created if missing): the table starts from it, the figures "
                                     "of --run-dir/--eval/--bench replace its entries, and it is rewritten")
    p.add_argument("--budget", type=budget, help="with --family: MACs, e.g. 100M, 0.5G or 90000000")
    p.add_argument("--data", help="with --checkpoint: its data dir, when not where it was trained")
    p.add_argument("--src-len", type=positive_int, default=SRC_LEN, help="source tokens (default: %(default)s)")
    p.add_argument("--tgt-len", type=positive_int, default=TGT_LEN, help="target tokens (default: %(default)s)")
    p.add_argument("--vocab-size", type=positive_int, default=VOCAB_SIZE,
                   help="dictionary entries for --arch (default: %(default)s); a checkpoint has its own")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)
