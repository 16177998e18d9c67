"""``lite compress prune | quantize | report``: pruning to a MAC budget, int8 of a model dir, the size/BLEU report.

    lite compress prune CHECKPOINT --budget 60M --out DIR          compress/prune/
    lite compress quantize MODEL_DIR --out DIR [--method ...]      compress/quantize.py, compress/inc.py
    lite compress report NAME=MODEL_DIR ... --out DIR [--split S]  eval/size_report.py

The libraries raise ``LiteError`` subclasses; ``lite.cli.main`` prints them (exit 2, or 3 for inc-tune's unmet
criterion). The handlers here only turn arguments into typed options and results into lines.
"""
from __future__ import annotations

import argparse
import json
import sys

import compress.prune as prune_lib
import compress.quantize as quantize_lib
import eval.size_report as report_lib
from lite.cli.types import budget, open_fraction, positive_int


def _kinds(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b"), blanks dropped."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _stage(text: str) -> tuple[str, str]:
    """``NAME=MODEL_DIR`` -> (name, model dir)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"stage {text!r}: write NAME=MODEL_DIR, e.g. int8=runs/export/lsra-int8")
    return name, path


# ---------------------------------------------------------------------------------------------- prune

def _prune(args) -> int:
    config = prune_lib.PruneConfig(args.budget, args.importance, args.step, args.kinds, args.taylor_batches,
                                   args.max_tokens)
    _, report = prune_lib.prune_checkpoint(args.checkpoint, args.out, config, data=args.data, force=args.force)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['checkpoint']}: {report['macs_before'] / 1e6:.2f}M -> {report['macs_after'] / 1e6:.2f}M MACs "
          f"(budget {report['budget'] / 1e6:.2f}M) in {len(report['steps'])} steps, params without embeddings "
          f"{report['params_no_embed_before']:,} -> {report['params_no_embed_after']:,}")
    for arg in report["dims_after"]:
        before, after = report["dims_before"][arg], report["dims_after"][arg]
        print(f"  {arg}: {before}" + (f" -> {after}" if after != before else " (kept)"))
    for kind, reason in report["skipped_kinds"].items():
        print(f"  not pruned: {kind}: {reason}")
    print(f"fine-tune: lite train CONFIG data=... save_dir=... --finetune-from {report['checkpoint']} "
          f"(the pruned dims come from the checkpoint)")
    return 0


def _add_prune(actions) -> None:
    name, report = prune_lib.CHECKPOINT_NAME, prune_lib.REPORT_NAME
    p = actions.add_parser("prune", help="structured pruning (torch-pruning) down to a MAC budget",
                           description=prune_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq checkpoint of a lite_transformer (.pt)")
    p.add_argument("--budget", type=budget, required=True, help="MACs, paper protocol, e.g. 60M or 0.5G")
    p.add_argument("--out", required=True, help=f"dir for {name} and {report}")
    p.add_argument("--importance", choices=prune_lib.IMPORTANCES, default="magnitude",
                   help="unit ranking: L2 magnitude, or first-order Taylor on training batches (default: %(default)s)")
    p.add_argument("--step", type=open_fraction, default=0.05, help="fraction of the remaining units per step "
                                                                    "(default: %(default)s)")
    p.add_argument("--kinds", type=_kinds, help="comma-separated model args to prune (default: every kind the "
                                                "model's args can describe), e.g. "
                                                "encoder_ffn_embed_dim,decoder_ffn_embed_dim")
    p.add_argument("--data", help="the checkpoint's prepared data dir, when not where it was trained")
    p.add_argument("--taylor-batches", type=positive_int, default=8, help="training batches for --importance taylor")
    p.add_argument("--max-tokens", type=positive_int, default=2048, help="tokens per such batch")
    p.add_argument("--force", action="store_true", help=f"replace an existing {name}")
    p.add_argument("--json", action="store_true", help="print prune.json's content")
    p.set_defaults(func=_prune)


# ---------------------------------------------------------------------------------------------- quantize

def _quantize(args) -> int:
    from compress.errors import QuantizeError
    from export.model_dir import ModelDir
    from lite.text import read_lines

    if (args.eval_source is None) != (args.eval_reference is None):
        raise QuantizeError("--eval-source and --eval-reference go together")
    lines = read_lines(args.calibration) if args.calibration else None
    heldout = None
    if args.eval_source:
        heldout = (read_lines(args.eval_source, args.eval_lines), read_lines(args.eval_reference, args.eval_lines))
    out = quantize_lib.quantize(args.model_dir, args.out, method=args.method, preset=args.preset,
                                calibration_lines=lines, force=args.force, max_bleu_drop=args.max_bleu_drop,
                                heldout=heldout, allow_loss=args.allow_loss, eval_lines=args.eval_lines,
                                compact=not args.no_compact)
    entry = ModelDir.open(out).description["quantization"]
    size = entry["bytes"]["total"]
    counts = ", ".join(f"{g} {c['MatMul'] + c['Gemm']}/{c['constant_weight_matmuls_fp32']}"
                       for g, c in entry["quantized"].items())
    print(f"{out}: {entry['method']} ({entry['preset']}), int8 MatMul/Gemm: {counts}; graphs and weights "
          f"{size['before']:,} -> {size['after']:,} bytes ({size['after'] / size['before']:.0%})")
    if "compact" in entry:
        c = entry["compact"]
        sqnr = c["validation"].get("sqnr_db")
        print(f"compact: {c['tensors']} tensors in {c['weights']} ({c['bytes']:,} bytes, {c['shared']} shared by both "
              f"graphs), embeddings int8 per row" + (
                  f"; SQNR vs fp32 (dB) encoder {sqnr['compact']['encoder']} ({sqnr['no_compact']['encoder']} "
                  f"without --compact), decoder step {sqnr['compact']['decoder_step']} "
                  f"({sqnr['no_compact']['decoder_step']})" if sqnr else f"; not validated: {c['validation']['skipped']}"))
    if "tuning" in entry:
        t = entry["tuning"]
        chosen = ", ".join(f"{g} {v['chosen']}" for g, v in t["graphs"].items())
        print(f"inc-tune: BLEU fp32 {t['fp32_bleu']} -> {t['bleu']} on {t['heldout_lines']} held-out lines "
              f"(criterion >= {t['threshold']}: {'met' if t['met'] else 'NOT met'}); chosen: {chosen}")
    return 0


def _add_quantize(actions) -> None:
    presets = quantize_lib.PRESETS
    p = actions.add_parser("quantize", help="int8 of an exported model dir (ONNX Runtime)",
                           description=quantize_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a model dir written by `lite export`")
    p.add_argument("--out", required=True, help="the quantized model dir to write")
    p.add_argument("--method", choices=quantize_lib.METHODS, default="ort-dynamic", help="default: %(default)s")
    p.add_argument("--preset", choices=tuple(presets), default="avx2",
                   help="target hardware: " + "; ".join(f"{p.name}: {p.why}" for p in presets.values())
                        + " (default: %(default)s)")
    p.add_argument("--calibration", help=f"ort-static: source sentences, one a line (default: the first "
                                         f"{quantize_lib.CALIBRATION_LINES} lines of <data>/raw/train.<src>)")
    p.add_argument("--max-bleu-drop", type=float, default=0.3,  # negative: demand a gain
                   help="inc-tune: BLEU the int8 model may lose on the held-out text (default: %(default)s)")
    p.add_argument("--allow-loss", action="store_true",
                   help="inc-tune: when no config meets --max-bleu-drop, keep the best and exit 0 (else exit 3)")
    p.add_argument("--eval-source", help="inc-tune: held-out source sentences (default: <data>/raw/valid.<src>)")
    p.add_argument("--eval-reference", help="inc-tune: their references (default: <data>/raw/valid.<tgt>)")
    p.add_argument("--eval-lines", type=positive_int, default=quantize_lib.HELDOUT_LINES,
                   help="inc-tune: held-out lines scored per trial (default: %(default)s)")
    p.add_argument("--no-compact", action="store_true",
                   help="one self-contained file per graph, embeddings fp32 (default: the compact layout: weights "
                        "stored once in weights.bin for both graphs, embedding tables int8 per row; inc-tune always "
                        "keeps the graphs its BLEU criterion measured)")
    p.add_argument("--force", action="store_true", help="replace an existing --out model dir")
    p.set_defaults(func=_quantize)


# ---------------------------------------------------------------------------------------------- report

def _report(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    stages = [report_lib.measure_stage(name, path, args.split, storage=not args.no_storage)
              for name, path in tqdm(args.stages, desc="stages", unit="stage", file=sys.stderr,
                                     disable=None)]  # no bar when stderr is not a terminal
    report_lib.write_report(stages, Path(args.out), args.split)
    print(report_lib.markdown(stages, args.split))
    return 0


def _add_report(actions) -> None:
    p = actions.add_parser("report", help="size, MACs and BLEU of each compression stage",
                           description=report_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", type=_stage, nargs="+", metavar="NAME=MODEL_DIR",
                   help="stages in order; the first is the reference")
    p.add_argument("--split", help="BLEU on this split of the data model.json names (e.g. test2016); none: no BLEU")
    p.add_argument("--out", required=True, help="dir for report.json and report.md")
    p.add_argument("--no-storage", action="store_true", help="skip the storage-only options")
    p.set_defaults(func=_report)


def register(sub) -> None:
    """``lite compress`` and its actions, on ``lite``'s subparsers."""
    group = sub.add_parser("compress", help="pruning to a budget, quantization, size report")
    actions = group.add_subparsers(dest="action", required=True)
    _add_prune(actions)
    _add_quantize(actions)
    _add_report(actions)
