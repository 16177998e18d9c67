"""Mult-Adds (MACs) and parameter counts of ``lite_transformer`` models: ``lite macs``.

Two costs are reported:

* **Paper protocol** (Lite Transformer paper; design.md "Protocols"): a source of S and a target of T tokens
  (30 + 30), batch 1, the full teacher-forced decoder pass; token embeddings and the output projection
  excluded; every matmul counted — linear layers, attention QK^T and AV (the full T x T product in the causal
  decoder, as computed), the convolution taps and dynamic conv's kernel-predicting ``weight_linear``.
  Elementwise work (scaling, layer norm, softmax, GLU, residual adds) is not counted.
* **Deployment cost**: MACs to translate one sentence of S tokens into T tokens as fairseq's beam search
  does it: the encoder once (batch 1), then T incremental decoder steps on ``beam`` hypotheses (its cached
  keys/values and conv frames; cross-attention keys/values of the memory computed once per hypothesis at the
  first step), the output projection at every step.

The counting is torchprofile's: its tracer (``torch.jit`` trace graph) and its per-operator handlers, applied
to the contractions only (``count_macs``). Parameters: total, and without embeddings (token embeddings, and
the output projection when it is not tied to them; sinusoidal positions have none).

    lite macs --arch lsra_wmt_200 [--src-len 30 --tgt-len 30 --vocab-size 10000] [--json]
    lite macs --checkpoint runs/x/checkpoints/checkpoint_best.pt
    lite macs --family lsra --budget 100M      # the largest embed dim whose preset fits the budget
    python -m eval.macs --markdown              # the README table of every preset
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

SRC_LEN = TGT_LEN = 30
VOCAB_SIZE = 10_000
BEAMS = (1, 4)

# Operators that multiply and accumulate; torchprofile's handler of each gives its MACs.
CONTRACTIONS = {"aten::linear", "aten::matmul", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm",
                "aten::addmv", "aten::_convolution", "aten::scaled_dot_product_attention", "aten::einsum"}
# Elementwise operators torchprofile does not list; they cost no MACs in the paper's protocol.
ELEMENTWISE = {"aten::glu", "aten::masked_fill", "aten::triu", "aten::new_full", "aten::new_zeros", "aten::type_as",
               "aten::cumsum", "aten::index_select", "aten::repeat_interleave", "aten::full", "aten::zeros_like",
               "aten::expand_as", "aten::ones_like", "aten::bernoulli_", "aten::empty_like", "aten::any",
               "aten::where", "aten::repeat", "aten::fill_", "aten::masked_fill_", "aten::logical_not",
               "aten::detach", "aten::embedding", "aten::new_ones", "aten::bitwise_not", "aten::log_softmax",
               "aten::pad", "aten::_shape_as_tensor", "aten::unbind", "aten::ones", "aten::remainder",
               "aten::maximum", "aten::exp", "aten::cat", "aten::stack"}


class MacsError(ValueError):
    """A model, arch or budget that cannot be counted; the message names the option and the fix."""


# ---------------------------------------------------------------------------------------------- counting

def _mm(node) -> int:
    # [n, p] = aten::mm([n, m], [m, p])  (torchprofile has no handler for it)
    (n, m), (_, p) = node.inputs[0].shape, node.inputs[1].shape
    return n * m * p


def count_macs(module: nn.Module, args: tuple) -> int:
    """MACs of ``module(*args)``: torchprofile's trace and handlers, contractions only.

    Counted: the CONTRACTIONS, and a product (``aten::mul``) that is then summed — a multiply-accumulate
    written as mul + sum, as DynamicConv's taps are (one MAC per product). Not counted: every other mul
    (scaling, masks) and layer norm, which torchprofile's own ``profile_macs`` counts as one MAC per element.
    An operator neither handled nor known to be elementwise is reported with a warning.

    fairseq's MultiheadAttention sends self-attention (no incremental state) through
    F.multi_head_attention_forward to ``aten::scaled_dot_product_attention``, whose torchprofile handler counts
    QK^T + AV; cross and incremental attention run ``bmm``: both are counted.
    """
    # vs torch.utils.flop_counter.FlopCounterMode (flops / 2, tests/test_macs.py): it counts matmul, conv and
    # attention kernels only, so it misses DynamicConv's taps (a broadcast mul + sum, T*B*C*K MACs each), and on
    # CPU (torch 2.13) it has no formula for the fused _scaled_dot_product_flash_attention_for_cpu kernel either.
    from torchprofile.handlers import HANDLER_MAP
    from torchprofile.trace import trace

    graph = trace(module, args)
    summed = {id(v) for node in graph.nodes if node.operator == "aten::sum" for v in node.inputs}
    total, unknown = 0, set()
    for node in graph.nodes:
        op = node.operator
        if op == "aten::mm":
            total += _mm(node)
        elif op in CONTRACTIONS:
            total += HANDLER_MAP[op](node)
        elif op in ("aten::mul", "aten::mul_") and any(id(v) in summed for v in node.outputs):
            total += HANDLER_MAP[op](node)
        elif op not in HANDLER_MAP and op not in ELEMENTWISE:
            unknown.add(op)
    if unknown:
        warnings.warn(f"eval/macs.py: operators not counted (add them to CONTRACTIONS or ELEMENTWISE): "
                      f"{sorted(unknown)}", stacklevel=2)
    return total


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """eval mode (no dropout ops in the trace) and no autograd, restoring the training flag."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


class EncoderLayers(nn.Module):
    """The encoder without its embeddings. Shape: embedded source S x B x C, padding mask B x S -> S x B x C."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        for layer in self.encoder.layers:
            x = layer(x, padding_mask)
        return x if self.encoder.layer_norm is None else self.encoder.layer_norm(x)


class DecoderLayers(nn.Module):
    """The decoder without embeddings and output projection, teacher-forced (no incremental state).

    Shape: embedded target T x B x C, memory S x B x C, memory padding mask B x S -> T x B x C.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, x: Tensor, memory: Tensor, memory_padding_mask: Tensor) -> Tensor:
        for layer in self.decoder.layers:
            x = layer(x, memory, memory_padding_mask, None)
        return x if self.decoder.layer_norm is None else self.decoder.layer_norm(x)


@dataclass(frozen=True)
class PaperMacs:
    encoder: int
    decoder: int

    @property
    def total(self) -> int:
        return self.encoder + self.decoder


def paper_macs(model: nn.Module, src_len: int = SRC_LEN, tgt_len: int = TGT_LEN, batch: int = 1) -> PaperMacs:
    """MACs of the encoder and decoder layer stacks on embedded inputs (the paper's protocol)."""
    c_enc, c_dec = model.encoder.embed_tokens.embedding_dim, model.decoder.embed_tokens.embedding_dim
    source = torch.randn(src_len, batch, c_enc)  # [S, B, C]
    target = torch.randn(tgt_len, batch, c_dec)  # [T, B, C]
    mask = torch.zeros(batch, src_len, dtype=torch.bool)  # [B, S], no padding
    with _inference(model):
        encoder = count_macs(EncoderLayers(model.encoder), (source, mask))
        decoder = count_macs(DecoderLayers(model.decoder), (target, source, mask))
    return PaperMacs(encoder, decoder)


class _Encode(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, src_tokens: Tensor) -> Tensor:
        return self.encoder(src_tokens)["encoder_out"][0]


class _DecoderStep(nn.Module):
    """One incremental step: prefix B x t -> features B x 1 x C; advances ``state`` (tracing runs it once)."""

    def __init__(self, decoder: nn.Module, encoder_out: dict, state: dict):
        super().__init__()
        self.decoder, self.encoder_out, self.state = decoder, encoder_out, state

    def forward(self, prefix: Tensor) -> Tensor:
        return self.decoder.extract_features(prefix, self.encoder_out, self.state)[0]


class _OutputProjection(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: Tensor) -> Tensor:
        return self.decoder.output_layer(features)


@dataclass(frozen=True)
class DecodeMacs:
    beam: int
    encoder: int  # once, batch 1
    decoder: int  # T incremental steps on `beam` hypotheses, output projection excluded
    output_projection: int  # T steps x beam x C x V

    @property
    def total(self) -> int:
        return self.encoder + self.decoder + self.output_projection


def _decoder_steps(decoder: nn.Module, encoder_out: dict, beam: int, tgt_len: int, traced: set[int]) -> dict[int, int]:
    """MACs of the traced steps (prefix length t -> MACs); the other steps only advance the incremental state."""
    dictionary, state, macs = decoder.dictionary, {}, {}
    step = _DecoderStep(decoder, encoder_out, state)
    prefix = torch.full((beam, 1), dictionary.eos())  # [beam, 1]
    for t in range(1, tgt_len + 1):
        if t in traced:
            macs[t] = count_macs(step, (prefix,))
        else:
            step(prefix)
        prefix = torch.cat([prefix, torch.randint(dictionary.nspecial, len(dictionary), (beam, 1))], dim=1)
    return macs


def decode_macs(model: nn.Module, src_len: int = SRC_LEN, tgt_len: int = TGT_LEN, beam: int = 1,
                every_step: bool = False) -> DecodeMacs:
    """MACs to translate one sentence of ``src_len`` tokens into ``tgt_len`` tokens with ``beam`` hypotheses.

    Tracing a step costs about a second, so by default steps 1, 2, 3 and the last are traced and steps 2..T
    taken on the line through steps 2 and 3 (self-attention reads t cached keys, the convolutions K-1 frames,
    cross attention its keys cached at step 1); when the last step is off that line every step is traced,
    as with ``every_step=True``.
    """
    dictionary = model.decoder.dictionary
    src = torch.randint(dictionary.nspecial, len(dictionary), (1, src_len))
    src[0, -1] = dictionary.eos()
    with _inference(model):
        encoder = count_macs(_Encode(model.encoder), (src,))
        # as fairseq's SequenceGenerator: the encoder output repeated once per hypothesis
        encoder_out = model.encoder.reorder_encoder_out(model.encoder(src), torch.zeros(beam, dtype=torch.long))
        every = set(range(1, tgt_len + 1))
        steps = _decoder_steps(model.decoder, encoder_out, beam, tgt_len, every if every_step else {1, 2, 3, tgt_len})
        if len(steps) < tgt_len:
            line = {t: steps[2] + (t - 2) * (steps[3] - steps[2]) for t in range(2, tgt_len + 1)}
            steps = {1: steps[1], **line} if line[tgt_len] == steps[tgt_len] else \
                _decoder_steps(model.decoder, encoder_out, beam, tgt_len, every)
        features = torch.zeros(beam, 1, model.decoder.embed_tokens.embedding_dim)  # [beam, 1, C]
        projection = tgt_len * count_macs(_OutputProjection(model.decoder), (features,))
    return DecodeMacs(beam, encoder, sum(steps.values()), projection)


# ---------------------------------------------------------------------------------------------- parameters

def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, without embeddings): shared tensors once; token embeddings and an untied output projection out."""
    embeddings = {id(model.encoder.embed_tokens.weight), id(model.decoder.embed_tokens.weight),
                  id(model.decoder.output_projection.weight)}
    params = list(model.parameters())  # deduplicated: a tied embedding appears once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if id(p) not in embeddings)


# ---------------------------------------------------------------------------------------------- models

def lite_archs() -> list[str]:
    """Every named architecture of ``lite_transformer`` (budget presets included)."""
    import lite.models.budgets  # noqa: F401  (registers the budget presets)
    from fairseq.models import ARCH_MODEL_REGISTRY

    from lite.models import LiteTransformerModel

    return sorted(a for a, m in ARCH_MODEL_REGISTRY.items() if m is LiteTransformerModel)


def dictionary(vocab_size: int):
    """A fairseq Dictionary of exactly ``vocab_size`` entries (its 4 specials included)."""
    from fairseq.data import Dictionary

    d = Dictionary()
    if vocab_size <= d.nspecial:
        raise MacsError(f"--vocab-size {vocab_size}: must exceed the {d.nspecial} special symbols")
    for i in range(vocab_size - len(d)):
        d.add_symbol(f"w{i}")
    return d


class _Task:
    def __init__(self, d):
        self.source_dictionary = self.target_dictionary = d


def build(args: argparse.Namespace, vocab_size: int = VOCAB_SIZE) -> nn.Module:
    """A ``LiteTransformerModel`` from model args, with a joined dictionary of ``vocab_size`` entries."""
    from lite.models import LiteTransformerModel

    return LiteTransformerModel.build_model(args, _Task(dictionary(vocab_size))).eval()


def build_arch(arch: str, vocab_size: int = VOCAB_SIZE) -> nn.Module:
    """A registered architecture with its defaults (``--arch NAME``)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    archs = lite_archs()
    if arch not in archs:
        raise MacsError(f"--arch {arch!r} is not a lite_transformer architecture; valid: {', '.join(archs)}")
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    return build(args, vocab_size)


@dataclass(frozen=True)
class Cost:
    """Everything ``lite macs`` reports about one model (the ``--json`` object)."""

    arch: str
    src_len: int
    tgt_len: int
    vocab_size: int
    macs: int
    encoder_macs: int
    decoder_macs: int
    params: int
    params_no_embed: int
    bytes_fp32: int
    bytes_int8: int  # weights at one byte each; scales and zero points not included
    decode_macs_beam1: int
    decode_macs_beam4: int


def measure(model: nn.Module, arch: str, src_len: int = SRC_LEN, tgt_len: int = TGT_LEN) -> Cost:
    paper = paper_macs(model, src_len, tgt_len)
    params, params_no_embed = count_params(model)
    beam1, beam4 = (decode_macs(model, src_len, tgt_len, beam).total for beam in BEAMS)
    return Cost(arch, src_len, tgt_len, len(model.decoder.dictionary), paper.total, paper.encoder, paper.decoder,
                params, params_no_embed, 4 * params, params, beam1, beam4)


# ---------------------------------------------------------------------------------------------- budgets

def parse_budget(text: str) -> int:
    """'100M', '1.5G', '500k', '90000000' -> MACs."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise MacsError(f"--budget {text!r}: expected a number with an optional k/M/G suffix, e.g. 100M")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def family_macs(family: str, dim: int, src_len: int = SRC_LEN, tgt_len: int = TGT_LEN) -> int:
    """Paper-protocol MACs of ``family`` at embed dim ``dim`` (the vocabulary does not enter them)."""
    from lite.models.budgets import FAMILIES

    args = argparse.Namespace()
    FAMILIES[family].build(args, dim)
    return paper_macs(build(args, vocab_size=8), src_len, tgt_len).total


def propose_dim(family: str, budget: int, src_len: int = SRC_LEN, tgt_len: int = TGT_LEN) -> tuple[int, int]:
    """(dim, MACs): the largest embed dim, a multiple of the family's step, whose MACs are <= ``budget``.

    Binary search; MACs grow with the dim (linear layers ~ d^2, attention ~ d).
    """
    from lite.models.budgets import FAMILIES

    if family not in FAMILIES:
        raise MacsError(f"--family {family!r}: valid families are {', '.join(sorted(FAMILIES))}")
    step = FAMILIES[family].multiple
    cost = {}

    def fits(k: int) -> bool:
        cost[k] = family_macs(family, k * step, src_len, tgt_len)
        return cost[k] <= budget

    if not fits(1):
        raise MacsError(f"--budget {budget:,}: even {family} at d={step} needs {cost[1]:,} MACs")
    low, high = 1, 2  # fits(low); find a high that does not fit
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step, cost[low]


# ---------------------------------------------------------------------------------------------- output

def _millions(n: int, digits: int = 1) -> str:
    return f"{n / 1e6:.{digits}f}M"


def markdown_table(archs: list[str] | None = None, src_len: int = SRC_LEN, tgt_len: int = TGT_LEN,
                   vocab_size: int = VOCAB_SIZE) -> str:
    """The README's table of every preset, measured (``python -m eval.macs --markdown``)."""
    rows = [f"| `--arch` | MACs ({src_len}+{tgt_len}) | params | params w/o embeddings | "
            f"decode MACs, beam 1 | decode MACs, beam 4 |",
            "|---|---:|---:|---:|---:|---:|"]
    for arch in archs if archs is not None else [a for a in lite_archs() if a != "lite_transformer"]:
        c = measure(build_arch(arch, vocab_size), arch, src_len, tgt_len)
        rows.append(f"| `{arch}` | {_millions(c.macs)} | {_millions(c.params, 2)} | {_millions(c.params_no_embed, 2)} "
                    f"| {_millions(c.decode_macs_beam1)} | {_millions(c.decode_macs_beam4)} |")
    note = (f"\nMACs: paper protocol ({src_len} source + {tgt_len} target tokens, teacher-forced, embeddings and "
            f"output projection excluded). Decode MACs: one sentence, {src_len} -> {tgt_len} tokens, incremental "
            f"decoding with the output projection, vocabulary {vocab_size}. Generated by `python -m eval.macs "
            f"--markdown`.")
    return "\n".join(rows) + "\n" + note


def _report(c: Cost) -> str:
    return "\n".join([
        f"{c.arch}: source {c.src_len}, target {c.tgt_len} tokens, vocabulary {c.vocab_size}",
        f"  MACs (paper protocol): {_millions(c.macs)}  (encoder {_millions(c.encoder_macs)}, "
        f"decoder {_millions(c.decoder_macs)})",
        f"  params: {_millions(c.params, 2)} total, {_millions(c.params_no_embed, 2)} without embeddings  "
        f"({c.bytes_fp32 / 2**20:.1f} MiB fp32, {c.bytes_int8 / 2**20:.1f} MiB int8)",
        f"  decode MACs, one sentence (incremental, output projection included): "
        f"beam 1 {_millions(c.decode_macs_beam1)}, beam 4 {_millions(c.decode_macs_beam4)}",
    ])


# ---------------------------------------------------------------------------------------------- CLI

def _macs(args: argparse.Namespace) -> int:
    from lite.checkpoint import CheckpointError

    try:
        if args.budget is not None and args.family is None:
            raise MacsError("--budget goes with --family (e.g. --family lsra --budget 100M)")
        if args.markdown:
            print(markdown_table(src_len=args.src_len, tgt_len=args.tgt_len, vocab_size=args.vocab_size))
            return 0
        if args.family is not None:
            if args.budget is None:
                raise MacsError(f"--family {args.family} needs --budget (e.g. --budget 100M)")
            budget = parse_budget(args.budget)
            dim, macs = propose_dim(args.family, budget, args.src_len, args.tgt_len)
            result = {"family": args.family, "budget": budget, "embed_dim": dim, "macs": macs,
                      "fraction_of_budget": round(macs / budget, 4)}
            print(json.dumps(result) if args.json else
                  f"{args.family} at --budget {budget / 1e6:g}M: embed dim {dim} ({_millions(macs)} MACs, "
                  f"{macs / budget:.1%} of the budget)")
            return 0
        if args.checkpoint is not None:
            from lite.translate import load_checkpoint

            model, _ = load_checkpoint(args.checkpoint, args.data)
            arch = getattr(getattr(model, "args", None), "arch", None) or str(args.checkpoint)
        else:
            model, arch = build_arch(args.arch, args.vocab_size), args.arch
        cost = measure(model, arch, args.src_len, args.tgt_len)
    except (MacsError, CheckpointError) as e:
        print(f"lite macs: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(cost)) if args.json else _report(cost))
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", help="a registered lite_transformer architecture")
    what.add_argument("--checkpoint", help="a fairseq checkpoint (.pt)")
    what.add_argument("--family", help="propose the largest embed dim of this family within --budget "
                                       "(lsra, transformer)")
    what.add_argument("--markdown", action="store_true", help="print the Markdown table of every preset")
    p.add_argument("--budget", help="with --family: MACs, e.g. 100M, 0.5G or 90000000")
    p.add_argument("--data", help="with --checkpoint: its data dir, when not where it was trained")
    p.add_argument("--src-len", type=int, default=SRC_LEN, help="source tokens (default: %(default)s)")
    p.add_argument("--tgt-len", type=int, default=TGT_LEN, help="target tokens (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE,
                   help="dictionary entries for --arch (default: %(default)s); a checkpoint has its own")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_macs)


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``macs`` subcommand to ``lite``'s subparsers; its handler is ``args.func(args) -> exit code``."""
    p = subparsers.add_parser("macs", help="Mult-Adds and parameters of a model; budget presets",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m eval.macs ...``, the same as ``lite macs ...``."""
    import lite  # noqa: F401  (registers the models)

    parser = argparse.ArgumentParser(prog="python -m eval.macs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
