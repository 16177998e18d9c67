"""``lite compress prune | quantize | report``: pruning to a MAC budget, int8 of a model dir, the size/BLEU report.

    lite compress prune CHECKPOINT --budget 60M --out DIR          compress/prune/
    lite compress sparsify CHECKPOINT --sparsity 0.8 --config C --out DIR   compress/sparsify.py
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
import compress.sparsify as sparsify_lib
import eval.size_report as report_lib
from lite.cli.types import budget, open_fraction, positive_float, positive_int, share, sparsity


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


# ---------------------------------------------------------------------------------------------- sparsify

def _sparsify(args) -> int:
    config = sparsify_lib.SparsifyConfig(args.sparsity, args.updates, args.ramp, args.interval, args.embeddings)
    report = sparsify_lib.sparsify(args.checkpoint, args.config, args.out, config, args.overrides, args.data,
                                   args.max_cpu_minutes, args.force)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    layers = report["layers"].values()
    print(f"{report['checkpoint']}: {report['zeros']:,} of {report['weights']:,} weights zero "
          f"({report['sparsity']:.1%}; per weight {min(layers):.1%} to {max(layers):.1%}) after {report['updates']} "
          f"updates")
    return 0


def _add_sparsify(actions) -> None:
    name, report = sparsify_lib.CHECKPOINT_NAME, sparsify_lib.REPORT_NAME
    p = actions.add_parser("sparsify", help="fine-grained magnitude pruning, gradual over a fine-tune",
                           description=sparsify_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq checkpoint (.pt), e.g. a trained or a structurally pruned one")
    p.add_argument("--sparsity", type=sparsity, required=True, help="final fraction of zeros in each weight, e.g. 0.8")
    p.add_argument("--config", required=True, help="the training recipe (configs/models/<family>/<preset>.yaml)")
    p.add_argument("--out", required=True, help=f"dir for train/, {name} and {report}")
    p.add_argument("--overrides", nargs="+", default=[], metavar="key=value",
                   help="override config keys, e.g. --overrides lr=5e-4 warmup_updates=50")
    p.add_argument("--updates", type=positive_int, default=300, help="updates of the fine-tune (default: %(default)s)")
    p.add_argument("--ramp", type=share, default=0.75,
                   help="share of the updates over which the sparsity grows (default: %(default)s)")
    p.add_argument("--interval", type=positive_int, help="updates between mask changes (default: the ramp / 20)")
    p.add_argument("--embeddings", action="store_true", help="prune the embedding tables too")
    p.add_argument("--data", help="prepared data dir (default: the checkpoint's)")
    p.add_argument("--max-cpu-minutes", type=positive_float, help="stop the fine-tune after this much CPU time")
    p.add_argument("--force", action="store_true", help=f"redo a finished {report}")
    p.add_argument("--json", action="store_true", help="print sparsify.json's content")
    p.set_defaults(func=_sparsify)


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
        if "packed" in c:
            p = c["packed"]
            print(f"packed: {p['file']} {p['packed_bytes']:,} bytes for the {p['bytes']:,} of {c['weights']} "
                  f"({p['bitmask_tensors']} sparse tensors as a bitmask and their non-zero bytes)")
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
    report_lib.write_report(stages, Path(args.out), args.split, command=" ".join(["lite", *sys.argv[1:]]))
    print(report_lib.markdown(stages, args.split))
    return 0


def _add_report(actions) -> None:
    p = actions.add_parser("report", help="size, MACs and BLEU of each compression stage",
                           description=report_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", type=_stage, nargs="+", metavar="NAME=MODEL_DIR",
                   help="stages in order; the first is the reference")
    p.add_argument("--split", help="BLEU on this split of the data model.json names (e.g. test2016); none: no BLEU")
    p.add_argument("--out", required=True, help="dir for report.json and report.md")
    p.add_argument("--no-storage", action="store_true", help="skip the storage-only options (their BLEU runs); the zip size is always measured")
    p.set_defaults(func=_report)


def register(sub) -> None:
    """``lite compress`` and its actions, on ``lite``'s subparsers."""
    group = sub.add_parser("compress", help="pruning to a budget, sparsity, quantization, size report")
    actions = group.add_subparsers(dest="action", required=True)
    _add_prune(actions)
    _add_sparsify(actions)
    _add_quantize(actions)
    _add_report(actions)
