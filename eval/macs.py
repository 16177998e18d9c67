"""Mult-Adds (MACs) and parameter counts of ``lite_transformer`` models (the counter behind ``lite macs``).

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

    model = lite.models.factory.build_arch("lsra_wmt_200")
    paper_macs(model).total, count_params(model), measure(model, "lsra_wmt_200")

Beside it: ``eval/budget.py`` (the largest embed dim of a family within a budget), ``eval/macs_table.py``
(the README table), ``lite/cli/macs.py`` (the ``lite macs`` command).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from eval.macs_protocol import BEAMS, SRC_LEN, TGT_LEN
from lite.errors import LiteError

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
               "aten::maximum", "aten::exp", "aten::cat", "aten::stack", "aten::elu", "aten::amax",
               "aten::narrow", "aten::scatter", "aten::__and__", "aten::__or__", "aten::tril",
               # the routing's and the hash's argmax, Reformer's bucket sort, the keys' unit norms (a reduction, not
               # counted, as layer norm is not), the logsumexp and running log-sums of Sinkhorn's balancing and the
               # logsumexp of Reformer's rounds
               "aten::argmax", "aten::sort", "aten::full_like", "aten::linalg_vector_norm", "aten::clamp_min",
               "aten::logsumexp", "aten::log"}


class MacsError(LiteError, ValueError):
    """A model, family or budget that cannot be counted; the message names the option and the fix (exit code 2)."""


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
    # vs torch.utils.flop_counter.FlopCounterMode (flops / 2, tests/eval/test_macs.py): it counts matmul, conv and
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


# ---------------------------------------------------------------------------------------------- one model

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
