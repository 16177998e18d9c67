"""Presets sized to a compute budget: the largest model of a family whose Mult-Adds fit the budget.

A budget is counted with the Lite Transformer paper's protocol (``eval/macs.py``): 30 source + 30 target
tokens, full teacher-forced decoder pass, token embeddings and output projection excluded. Every preset
named ``<family>_<budget>`` must land in [0.9 x budget, budget]; ``tests/eval/test_macs.py`` walks the registry.
The dims below are what ``lite macs --family <family> --budget <budget>`` proposes (``eval/budget.py``).

Later families add themselves to ``FAMILIES`` (how a dim becomes a preset) and ``BUDGET_PRESETS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fairseq.models import register_model_architecture

from lite.models.architectures import (MODEL, _bigbird, _fastformer, _flash, _isab, _linear, _linformer, _local,
                                      _longformer, _lsra_wmt, _memory_compressed, _performer,
                                      _poolingformer, _reformer, _routing, _sinkhorn, _strided, _synthesizer,
                                      _transformer)

M = 1_000_000
FLASH_CHUNK = 16  # Multi30k sentences average ~15 subwords: about half of them span a chunk boundary


@dataclass(frozen=True)
class Family:
    """How to fill ``args`` for a member of the family at embed dim ``dim``; dims step by ``multiple``."""

    build: Callable[[object, int], None]
    multiple: int  # every dim must divide by the heads: LSRA 2 x 4 (half per branch, 4 heads) and 8 cross heads
    description: str


FAMILIES: dict[str, Family] = {
    "lsra": Family(lambda args, dim: _lsra_wmt(args, dim, dropout=0.1, attention_dropout=0.08), 8,
                   "LSRA, WMT style: dynamic conv + GLU, FFN = embed, 6+6 layers"),
    "transformer": Family(_transformer, 8, "Transformer: FFN = 4 x embed, 4 heads below d=256 and 8 from it, 6+6"),
    "flash_quad": Family(lambda args, dim: _flash(args, dim, chunk_size=0), 8,
                         "FLASH-Quad: GAU (e = 2d, s = 128), no FFN, 12+12 layers, pre-norm"),
    "flash": Family(lambda args, dim: _flash(args, dim, chunk_size=FLASH_CHUNK), 8,
                    f"FLASH: GAU with mixed chunk attention (C = {FLASH_CHUNK}), no FFN, 12+12 layers, pre-norm"),
    "fastformer": Family(_fastformer, 8, "Fastformer: additive attention in place of self-attention, FFN = 4 x embed, "
                                         "6+6"),
    "linear": Family(_linear, 8, "Linear Transformer: elu + 1 kernel attention in place of self-attention, FFN = 4 x "
                                 "embed, 6+6"),
    "performer": Family(_performer, 8, "Performer: FAVOR+ attention (D ln D random features a head) in place of "
                                       "self-attention, FFN = 4 x embed, 6+6"),
    "local": Family(_local, 8, "Local attention: blocks of 16 tokens, each attending to itself and the previous block, "
                               "in place of self-attention, FFN = 4 x embed, 6+6"),
    "synthesizer_dense": Family(lambda args, dim: _synthesizer(args, dim, "dense"), 8,
                                "Dense Synthesizer: attention weights from a per-token MLP in place of self-attention, "
                                "FFN = 4 x embed, 6+6"),
    "synthesizer_random": Family(lambda args, dim: _synthesizer(args, dim, "random"), 8,
                                 "Random Synthesizer: learned input-free attention weights in place of self-attention, "
                                 "FFN = 4 x embed, 6+6"),
    "linformer": Family(_linformer, 8, "Linformer: keys and values projected to k = 32 along the length in the "
                                       "encoder, standard causal attention in the decoder, FFN = 4 x embed, 6+6"),
    "memory_compressed": Family(_memory_compressed, 8, "Memory-compressed attention: keys and values compressed 3-fold "
                                                       "along the length by a strided convolution in the encoder, "
                                                       "standard causal attention in the decoder, FFN = 4 x embed, "
                                                       "6+6"),
    "strided": Family(_strided, 8, "Strided attention (Sparse Transformer): half the heads see the last 4 positions, "
                                   "half every 4th, in place of self-attention, FFN = 4 x embed, 6+6"),
    "longformer": Family(_longformer, 8, "Longformer: a sliding window of 4 positions on each side plus the first "
                                         "token global, in place of self-attention, FFN = 4 x embed, 6+6"),
    "bigbird": Family(_bigbird, 8, "BigBird: a sliding window of 3 positions on each side, the first token global and "
                                   "2 random keys a query in the encoder, standard causal attention in the decoder, "
                                   "FFN = 4 x embed, 6+6"),
    "isab": Family(_isab, 8, "ISAB (Set Transformer): 8 learned inducing points attend to the sentence and every "
                             "token to them in the encoder, standard causal attention in the decoder, FFN = 4 x "
                             "embed, 6+6"),
    "routing": Family(_routing, 8, "Routing Transformer: queries and keys routed to the nearest of 4 k-means "
                                   "centroids a head, attention within a cluster, in place of self-attention, "
                                   "FFN = 4 x embed, 6+6"),
    "sinkhorn": Family(_sinkhorn, 8, "Sparse Sinkhorn attention: blocks of 4 tokens, each attending to itself and "
                                     "the block a Sinkhorn-balanced soft permutation (5 iterations, temperature 0.75) "
                                     "sorts next to it (causal balancing in the decoder), in place of self-attention, "
                                     "FFN = 4 x embed, 6+6"),
    "poolingformer": Family(_poolingformer, 8, "Poolingformer: a sliding window of 4 positions on each side, then "
                                               "attention over pools of 4 within 16 positions on each side, in the "
                                               "encoder, standard causal attention in the decoder, FFN = 4 x embed, "
                                               "6+6"),
    "reformer": Family(_reformer, 4, "Reformer: shared-QK LSH attention (8 buckets, 1 hash round), in the encoder "
                                     "within chunks of 8 in bucket-sorted order (a chunk and the previous one), in the "
                                     "decoder over every earlier key of the bucket, FFN = 4 x embed, 6+6"),
}

# family -> {budget in MACs -> arch}
BUDGET_PRESETS: dict[str, dict[int, str]] = {
    "lsra": {100 * M: "lsra_100m", 500 * M: "lsra_500m"},
    "transformer": {100 * M: "transformer_100m", 500 * M: "transformer_500m"},
    "flash_quad": {100 * M: "flash_quad_100m", 500 * M: "flash_quad_500m"},
    "flash": {100 * M: "flash_100m", 500 * M: "flash_500m"},
    "fastformer": {100 * M: "fastformer_100m", 500 * M: "fastformer_500m"},
    "linear": {100 * M: "linear_100m"},
    "performer": {100 * M: "performer_100m"},
    "local": {100 * M: "local_100m"},
    "synthesizer_dense": {100 * M: "synthesizer_dense_100m"},
    "synthesizer_random": {100 * M: "synthesizer_random_100m"},
    "linformer": {100 * M: "linformer_100m"},
    "memory_compressed": {100 * M: "memory_compressed_100m"},
    "strided": {100 * M: "strided_100m"},
    "longformer": {100 * M: "longformer_100m"},
    "bigbird": {100 * M: "bigbird_100m"},
    "isab": {100 * M: "isab_100m"},
    "routing": {100 * M: "routing_100m"},
    "sinkhorn": {100 * M: "sinkhorn_100m"},
    "poolingformer": {100 * M: "poolingformer_100m"},
    "reformer": {100 * M: "reformer_100m"},
}


@register_model_architecture(MODEL, "lsra_100m")
def lsra_100m(args):  # d=208: 97.7M MACs; dropout of lsra_wmt_200
    _lsra_wmt(args, 208, dropout=0.04, attention_dropout=0.03)


@register_model_architecture(MODEL, "lsra_500m")
def lsra_500m(args):  # d=480: 495.8M MACs; dropout of lsra_wmt_496
    _lsra_wmt(args, 480, dropout=0.1, attention_dropout=0.08)


@register_model_architecture(MODEL, "transformer_100m")
def transformer_100m(args):  # d=136 (4 heads): 97.6M MACs
    _transformer(args, 136)


@register_model_architecture(MODEL, "transformer_500m")
def transformer_500m(args):  # d=304 (8 heads): 475.6M MACs (d=312: 500.7M)
    _transformer(args, 304)


@register_model_architecture(MODEL, "flash_quad_100m")
def flash_quad_100m(args):  # d=112: 92.6M MACs
    _flash(args, 112, chunk_size=0)


@register_model_architecture(MODEL, "flash_quad_500m")
def flash_quad_500m(args):  # d=280: 498.3M MACs
    _flash(args, 280, chunk_size=0)


@register_model_architecture(MODEL, "flash_100m")
def flash_100m(args):  # d=88: 93.0M MACs (with s = 128 > d the linear part, 2 s e MACs a frame, is dear)
    _flash(args, 88, chunk_size=FLASH_CHUNK)


@register_model_architecture(MODEL, "flash_500m")
def flash_500m(args):  # d=248: 487.7M MACs
    _flash(args, 248, chunk_size=FLASH_CHUNK)


@register_model_architecture(MODEL, "fastformer_100m")
def fastformer_100m(args):  # d=136 (4 heads): 96.6M MACs
    _fastformer(args, 136)


@register_model_architecture(MODEL, "fastformer_500m")
def fastformer_500m(args):  # d=312 (8 heads): 499.3M MACs
    _fastformer(args, 312)


@register_model_architecture(MODEL, "linear_100m")
def linear_100m(args):  # d=136 (4 heads): 98.1M MACs
    _linear(args, 136)


@register_model_architecture(MODEL, "performer_100m")
def performer_100m(args):  # d=120 (4 heads of 30, 102 features each): 91.7M MACs
    _performer(args, 120)


@register_model_architecture(MODEL, "local_100m")
def local_100m(args):  # d=136 (4 heads, blocks of 16): 98.0M MACs
    _local(args, 136)


@register_model_architecture(MODEL, "synthesizer_dense_100m")
def synthesizer_dense_100m(args):  # d=136 (4 heads, N = 256): 91.0M MACs (d=144: over 100M)
    _synthesizer(args, 136, "dense")


@register_model_architecture(MODEL, "synthesizer_random_100m")
def synthesizer_random_100m(args):  # d=144 (4 heads, N = 256): 92.7M MACs (d=152: over 100M)
    _synthesizer(args, 144, "random")


@register_model_architecture(MODEL, "linformer_100m")
def linformer_100m(args):  # d=136 (4 heads, k = 32, N = 256; attention decoder): 99.3M MACs
    _linformer(args, 136)


@register_model_architecture(MODEL, "memory_compressed_100m")
def memory_compressed_100m(args):  # d=128 (4 heads, stride 3; attention decoder): 91.7M MACs (d=136: 103.3M)
    _memory_compressed(args, 128)


@register_model_architecture(MODEL, "strided_100m")
def strided_100m(args):  # d=136 (4 heads: 2 local, 2 strided; stride 4): 95.4M MACs (d=144: 106.8M)
    _strided(args, 136)


@register_model_architecture(MODEL, "longformer_100m")
def longformer_100m(args):  # d=136 (4 heads; window 4 each side, 1 global token): 95.5M MACs (d=144: 106.9M)
    _longformer(args, 136)


@register_model_architecture(MODEL, "bigbird_100m")
def bigbird_100m(args):  # d=136 (4 heads; window 3, 1 global, 2 random, N = 256; attention decoder): 97.6M MACs
    _bigbird(args, 136)


@register_model_architecture(MODEL, "isab_100m")
def isab_100m(args):  # d=136 (4 heads, m = 8 inducing points; attention decoder): 99.6M MACs (d=144: 111.4M)
    _isab(args, 136)
@register_model_architecture(MODEL, "routing_100m")
def routing_100m(args):  # d=136 (4 heads, 4 centroids a head, encoder and decoder): 98.0M MACs (d=144: 106.3M)
    _routing(args, 136)
@register_model_architecture(MODEL, "sinkhorn_100m")
def sinkhorn_100m(args):  # d=136 (4 heads; blocks of 4, K = 5, tau = 0.75): 98.2M MACs (d=144: 109.9M)
    _sinkhorn(args, 136)
@register_model_architecture(MODEL, "poolingformer_100m")
def poolingformer_100m(args):  # d=128 (4 heads; w1 4, w2 16, pools of 4; attention decoder): 95.1M MACs (d=136:
    # 107.1M)
    _poolingformer(args, 128)
@register_model_architecture(MODEL, "reformer_100m")
def reformer_100m(args):  # d=140 (4 heads; 8 buckets, 1 round, chunks of 8): 95.8M MACs (d=144: 101.2M)
    _reformer(args, 140)
