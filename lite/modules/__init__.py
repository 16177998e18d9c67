"""Token mixers: one module per mechanism, all with the interface

    mixer(x: T x B x C, padding_mask: B x T | None, incremental_state) -> T x B x C

and one registry, ``MIXERS``, from the name used by ``--encoder-mixer`` / ``--decoder-mixer``
to a builder ``(spec) -> nn.Module``. Every mixer serves an encoder; ``CAUSAL_MIXERS`` are those with a causal form,
the only ones a decoder can use (the model refuses any other when it is built).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from lite.modules.attention import SelfAttention
from lite.modules.bigbird_attention import BigBirdAttention, bigbird_attention_from_spec
from lite.modules.conv import DynamicConv, LightweightConv
from lite.modules.fastformer import Fastformer, fastformer_from_spec
from lite.modules.ffn import FeedForward
from lite.modules.gau import GAU, gau_from_spec
from lite.modules.isab import InducedSetAttention, isab_from_spec
from lite.modules.linear_attention import LinearAttention, linear_attention_from_spec
from lite.modules.linformer import Linformer, linformer_from_spec
from lite.modules.local_attention import LocalAttention, local_attention_from_spec
from lite.modules.longformer_attention import LongformerAttention, longformer_attention_from_spec
from lite.modules.lsra import LSRA, ConvBranch
from lite.modules.memory_compressed import MemoryCompressedAttention, memory_compressed_from_spec
from lite.modules.performer import performer_from_spec
from lite.modules.routing_attention import RoutingAttention, routing_attention_from_spec
from lite.modules.sinkhorn_attention import SinkhornAttention, sinkhorn_attention_from_spec
from lite.modules.poolingformer import PoolingformerAttention, poolingformer_from_spec
from lite.modules.reformer import ReformerAttention, reformer_attention_from_spec
from lite.modules.strided_attention import StridedAttention, strided_attention_from_spec
from lite.modules.synthesizer import Synthesizer, dense_synthesizer_from_spec, random_synthesizer_from_spec


@dataclass(frozen=True)
class MixerSpec:
    """What a mixer needs to know about its place in the model."""

    embed_dim: int
    attention_heads: int
    causal: bool
    kernel_size: int
    conv_type: str  # "lightweight" | "dynamic"
    conv_heads: int
    conv_glu: bool
    weight_softmax: bool
    weight_dropout: float
    attention_dropout: float
    gau_expansion: int = 2  # GAU: U, V width = expansion x embed dim
    gau_key_dim: int = 128  # GAU: s, the width of the shared Z from which Q and K are made
    chunk_size: int = 0  # FLASH: mixed-chunk attention with chunks of this size; 0 = quadratic (FLASH-Quad)
    attention_head_dim: int | None = None  # channels per attention head; None: the attention's width // heads
    gau_hidden_dim: int | None = None  # GAU: U, V width; None: gau_expansion x embed dim
    conv_head_dim: int | None = None  # channels per conv head (inner width conv_heads x it); None: width // heads
    performer_features: int = 0  # Performer: random features per head; 0 = round(D ln D)
    local_block: int = 16  # local attention: block size L (a query sees its block and the previous one)
    synthesizer_max_len: int = 256  # Synthesizer: the longest input, N (logits over N positions)
    linformer_max_len: int = 256  # Linformer: the longest input, N (E and F are k x N)
    linformer_k: int = 32  # Linformer: the length keys and values are projected to
    compress_stride: int = 3  # memory-compressed attention: kernel and stride of the key/value convolution
    stride: int = 4  # strided attention: s (local heads see the last s positions, strided heads every s-th)
    longformer_window: int = 4  # Longformer: w, the keys a query sees on each side (decoder: the last w)
    longformer_global: int = 1  # Longformer: g, the first g real tokens attend to all and all attend to them
    bigbird_window: int = 3  # BigBird: w, the keys a query sees on each side
    bigbird_global: int = 1  # BigBird: g, the first g real tokens attend to all and all attend to them
    bigbird_random: int = 2  # BigBird: r, the random keys a query sees (drawn once, from a fixed seed)
    bigbird_max_len: int = 256  # BigBird: the longest input, N (the random keys are drawn for N positions)
    isab_inducing_points: int = 8  # ISAB: m, the learned inducing points that summarize the sentence
    routing_clusters: int = 4  # routing attention: c, the k-means centroids a head (a query sees its cluster's keys)
    routing_decay: float = 0.999  # routing attention: lambda, the centroids' moving-average decay in training
    sinkhorn_block: int = 4  # Sinkhorn attention: b, the block size (a query sees its block and its sorted block)
    sinkhorn_iterations: int = 5  # Sinkhorn attention: K, the rounds of row and column normalization
    sinkhorn_temperature: float = 0.75  # Sinkhorn attention: tau, the SortNet's scores are divided by it
    poolingformer_window: int = 4  # Poolingformer: w1, the first level's window on each side
    poolingformer_pool_window: int = 16  # Poolingformer: w2, the second level's (pooled) window on each side
    poolingformer_pool: int = 4  # Poolingformer: k, the pooling's kernel and stride
    reformer_buckets: int = 8  # Reformer: n, the LSH buckets a round (even: argmax over [xA; -xA])
    reformer_hashes: int = 1  # Reformer: R, the hash rounds (combined by their logsumexp weights)
    reformer_chunk: int = 8  # Reformer (encoder): c, the chunk length in bucket-sorted order

    def check_equal_heads(self, mechanism: str) -> None:
        """For mixers whose heads split the width: refuse a head dim (``--*-attention-head-dim``) that does not."""
        head_dim = self.attention_head_dim
        if head_dim is not None and head_dim * self.attention_heads != self.embed_dim:
            raise ValueError(f"{mechanism}: heads of {head_dim} channels (--*-attention-head-dim) are not supported; "
                             f"its {self.attention_heads} heads split the {self.embed_dim} channels: leave the head "
                             f"dim unset")


CONVS = {"lightweight": LightweightConv, "dynamic": DynamicConv}


def _conv_branch(spec: MixerSpec, channels: int) -> ConvBranch:
    """A convolution branch ``channels`` wide outside, conv_heads x conv_head_dim inside (default ``channels``)."""
    if spec.conv_type not in CONVS:
        raise ValueError(f"unknown conv type {spec.conv_type!r}; valid: {sorted(CONVS)}")
    if spec.conv_head_dim is not None and spec.conv_head_dim < 1:
        raise ValueError(f"--conv-head-dim {spec.conv_head_dim}: must be positive (or unset: width // conv heads)")
    inner = channels if spec.conv_head_dim is None else spec.conv_heads * spec.conv_head_dim
    conv = CONVS[spec.conv_type](inner, spec.kernel_size, spec.conv_heads, spec.causal,
                                 weight_softmax=spec.weight_softmax, weight_dropout=spec.weight_dropout)
    return ConvBranch(channels, conv, spec.conv_glu)


def _attention(spec: MixerSpec) -> nn.Module:
    return SelfAttention(spec.embed_dim, spec.attention_heads, spec.causal, spec.attention_dropout,
                         head_dim=spec.attention_head_dim)


def _lsra(spec: MixerSpec) -> nn.Module:
    half = spec.embed_dim // 2
    attention = SelfAttention(half, spec.attention_heads, spec.causal, spec.attention_dropout,
                              head_dim=spec.attention_head_dim)
    return LSRA(attention, _conv_branch(spec, spec.embed_dim - half), split=half)


def _conv(spec: MixerSpec) -> nn.Module:
    return _conv_branch(spec, spec.embed_dim)


MIXERS: dict[str, Callable[[MixerSpec], nn.Module]] = {
    "attention": _attention,
    "lsra": _lsra,
    "conv": _conv,
    "gau": gau_from_spec,  # FLASH-Quad (chunk_size 0) and FLASH (mixed chunks)
    "fastformer": fastformer_from_spec,
    "linear": linear_attention_from_spec,  # Linear Transformer (elu + 1 kernel; causal by prefix sums)
    "performer": performer_from_spec,  # FAVOR+ random features of the softmax kernel, the same linear attention
    "local": local_attention_from_spec,  # blockwise local attention (its block and the previous one)
    "synthesizer_dense": dense_synthesizer_from_spec,  # weights from a per-token MLP, values from the input
    "synthesizer_random": random_synthesizer_from_spec,  # learned input-free weights, values from the input
    "linformer": linformer_from_spec,  # keys and values projected along the length to k rows; encoder only
    "memory_compressed": memory_compressed_from_spec,  # keys and values compressed by a strided conv; encoder only
    "strided": strided_attention_from_spec,  # Sparse Transformer strided pattern: half the heads local, half strided
    "longformer": longformer_attention_from_spec,  # a sliding window of 2 w + 1 keys plus g global tokens
    "bigbird": bigbird_attention_from_spec,  # a window, g global tokens and r random keys a query; encoder only
    "isab": isab_from_spec,  # Set Transformer ISAB: m inducing points read the sentence, it reads them; encoder only
    "routing": routing_attention_from_spec,  # Routing Transformer: keys of the query's nearest k-means centroid
    "sinkhorn": sinkhorn_attention_from_spec,  # its block and a block sorted next to it by a Sinkhorn permutation
    "poolingformer": poolingformer_from_spec,  # a window, then pooled keys/values in a wider one; encoder only
    "reformer": reformer_attention_from_spec,  # shared-QK attention within LSH buckets (encoder: sorted chunks)
}

# the mixers with a causal form: those a decoder can use
CAUSAL_MIXERS = frozenset(MIXERS) - {"linformer", "memory_compressed", "bigbird", "isab", "poolingformer"}


def build_mixer(name: str, spec: MixerSpec) -> nn.Module:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid: {sorted(MIXERS)}")
    return MIXERS[name](spec)


__all__ = ["MIXERS", "CAUSAL_MIXERS", "MixerSpec", "build_mixer", "FeedForward", "SelfAttention", "LSRA", "ConvBranch",
           "LightweightConv", "DynamicConv", "GAU", "Fastformer",
           "LinearAttention", "LocalAttention", "Synthesizer", "Linformer",
           "MemoryCompressedAttention", "StridedAttention", "LongformerAttention", "BigBirdAttention",
           "InducedSetAttention", "RoutingAttention",
           "SinkhornAttention",
           "PoolingformerAttention",
           "ReformerAttention"]
