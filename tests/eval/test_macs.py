"""eval/macs.py, eval/budget.py, eval/macs_table.py, ``lite macs``: the paper's MAC and parameter figures, a hand
count, FlopCounterMode, budget presets, the command line.

Expected numbers come from the Lite Transformer paper (pinned) and from ``reference_*`` below, a hand count
from the model args that shares no code with the torchprofile-based counter.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

from eval import macs
from eval.budget import family_macs
from eval.macs_table import markdown_table
from lite.checkpoint import CheckpointError
from lite.cli import macs as macs_cli
from lite.cli.types import budget as parse_budget
from lite.errors import LiteError
from lite.models.budgets import BUDGET_PRESETS, FAMILIES
from lite.models.factory import ModelArgsError, arch_args, build_arch, lite_archs
from tests.conftest import LITE, ROOT, TINY, run, tiny_model

M = 1e6
# Lite Transformer paper (Table 3 / Figure 1, WMT): Mult-Adds at 30 + 30 tokens; params without embeddings
PAPER_MACS = {"lsra_wmt_200": 90.7 * M, "lsra_wmt_408": 360.6 * M, "lsra_wmt_496": 528.7 * M,
              "transformer_d128": 86.7 * M, "transformer_d256": 338.6 * M, "transformer_d320": 526.5 * M}
PAPER_PARAMS_NO_EMBED = {"lsra_wmt_200": 2.88 * M, "lsra_wmt_408": 11.74 * M, "lsra_wmt_496": 17.28 * M}
TINY_ARCHS = ["lsra_iwslt_160", "lsra_wmt_200", "transformer_d128",  # lightweight conv, dynamic conv + GLU, attention
              "linear_100m", "performer_100m", "local_100m", "synthesizer_dense_100m", "synthesizer_random_100m",
              "linformer_100m", "memory_compressed_100m", "strided_100m", "longformer_100m",
              "bigbird_100m", "isab_100m", "routing_100m", "sinkhorn_100m",
              "poolingformer_100m", "reformer_100m"]


# ------------------------------------------------------------------------------------ hand count

def _kernels(args, side: str) -> list[int]:
    sizes = [int(k) for k in str(getattr(args, f"{side}_kernel_size_list")).split(",")]
    layers = getattr(args, f"{side}_layers")
    return (sizes * layers)[:layers] if len(sizes) == 1 else sizes[:layers]


def _mixer(args, side: str, queries: int, keys: int, kernel: int, step: bool = False) -> int:
    """One mixer: attention on all channels, LSRA (attention on half, conv branch on half) or conv; GAU and
    Fastformer on a whole sequence only (queries == keys). Linformer (encoder only): q, k, v and out, 4 C^2 a frame;
    E K and F V, k C a frame each; q K'^T and the weights times V', k C a frame each."""
    dim, mixer = getattr(args, f"{side}_embed_dim"), getattr(args, f"{side}_mixer")
    if mixer in ("linear", "performer"):
        return _linear(args, side, queries, causal_pass=side == "decoder" and not step)
    if mixer == "local":
        return _local(args, side, queries, step)
    if mixer.startswith("synthesizer_"):
        return _synthesizer(mixer, dim, queries, keys)
    if mixer == "linformer":
        assert queries == keys, "Linformer serves the encoder only: a full pass"
        return queries * 4 * dim * dim + 4 * queries * args.linformer_k * dim
    if mixer == "strided":
        return _strided(args, side, queries, keys, step)
    if mixer == "longformer":
        return _longformer(args, side, queries, keys, step)
    if mixer == "bigbird":
        assert queries == keys, "BigBird attention serves the encoder only: a full pass"
        return _bigbird(args, side, queries)
    if mixer == "isab":
        assert queries == keys, "ISAB serves the encoder only: a full pass"
        return _isab(args, side, queries)
    if mixer == "routing":
        return _routing(args, side, queries, keys, step)
    if mixer == "sinkhorn":
        return _sinkhorn(args, side, queries, keys, step)
    if mixer == "poolingformer":
        assert queries == keys, "Poolingformer attention serves the encoder only: a full pass"
        return _poolingformer(args, side, queries)
    if mixer == "reformer":
        return _reformer(args, side, queries, keys, step)
    if mixer == "memory_compressed":
        assert queries == keys, "memory-compressed attention serves the encoder only: a full pass"
        return _memory_compressed(args, side, queries)
    if mixer in ("gau", "fastformer"):
        assert queries == keys, "the GAU and Fastformer hand counts cover the full pass only"
        return (_gau if mixer == "gau" else _fastformer)(args, side, queries)
    attn = {"attention": dim, "lsra": dim // 2, "conv": 0}[mixer]
    conv = dim - attn
    macs = queries * 4 * attn * attn + 2 * queries * keys * attn  # q, k, v, out projections; QK^T and AV
    if conv:
        macs += queries * conv * conv * (2 if args.conv_glu else 1) + queries * conv * conv  # linear1, linear2
        macs += queries * conv * kernel  # the taps
        if args.conv_type == "dynamic":
            macs += queries * conv * args.conv_heads * kernel  # weight_linear: C -> H*K
    return macs


def _gau(args, side: str, length: int) -> int:
    """A gated attention unit on ``length`` frames (C embed, E = U/V width, S key width, L chunk size).

    X -> U, V, Z: C x (2E + S) a frame; out: E x C a frame. FLASH-Quad: relu^2(QK^T) and AV over all T x T pairs,
    T^2 (S + E). FLASH: frames padded to G whole chunks of L; in each chunk QK^T and AV over L x L pairs, and the
    linear part: k'^T v (S x E a frame) and q' times the pooled S x E state (S x E a frame), causal or not.
    """
    c, s, chunk = getattr(args, f"{side}_embed_dim"), args.gau_key_dim, args.chunk_size
    e = args.gau_hidden_dim or args.gau_expansion * c
    macs = length * c * (2 * e + s) + length * e * c
    if chunk == 0:
        return macs + length * length * (s + e)
    padded = -(-length // chunk) * chunk  # G x L
    return macs + padded * chunk * (s + e) + 2 * padded * s * e


def _fastformer(args, side: str, length: int) -> int:
    """Fastformer additive attention on ``length`` frames (C channels, H heads).

    q, k, v: 3 C^2 a frame; the two score layers w_q, w_k: C x H a frame each; out: C^2 a frame. Each of the two
    softmax poolings sums the frames' C-vectors with per-head weights: C a frame for the one global vector of the
    encoder, and in the causal decoder one prefix sum per frame, computed as a masked T x T weight matrix: T^2 C.
    """
    c = getattr(args, f"{side}_embed_dim")
    heads = args.mixer_attention_heads or getattr(args, f"{side}_attention_heads")
    pool = length * length * c if side == "decoder" else length * c
    return length * 3 * c * c + 2 * length * c * heads + 2 * pool + length * c * c


def _linear(args, side: str, frames: int, causal_pass: bool) -> int:
    """Linear attention on ``frames`` frames (C channels, H heads of D, M features a head): q, k, v and out, 4 C^2 a
    frame. The encoder, and one decoding step: per head a frame adds phi(k) v^T to S (M D) and reads phi(q) S (M D)
    and phi(q) . z (M): 2 C M + H M a frame. The decoder's full causal pass, in N blocks of L = min(64, T) frames
    (the last padded), per head: phi(q) phi(k)^T and the weights times v within each block, N L^2 (M + D); with
    N > 1, phi(k) v^T of the N - 1 blocks before the last (M D a frame of them) and phi(q) S, phi(q) . z for every
    padded frame, N L (M D + M). elu + 1 has M = D; FAVOR+ makes M features of q and of k (x W^T: D M a head each)
    and their |x|^2 (D a head each): 2 C M + 2 C more."""
    c = getattr(args, f"{side}_embed_dim")
    heads = args.mixer_attention_heads or getattr(args, f"{side}_attention_heads")
    d = c // heads
    m = d if getattr(args, f"{side}_mixer") == "linear" else args.performer_features or round(d * math.log(d))
    favor = 0 if getattr(args, f"{side}_mixer") == "linear" else frames * (2 * c * m + 2 * c)
    if not causal_pass:
        return frames * (4 * c * c + 2 * c * m + heads * m) + favor
    blocks, size = -(-frames // 64), min(64, frames)
    sums = heads * ((blocks - 1) * size * m * d + blocks * size * (m * d + m)) if blocks > 1 else 0
    return frames * 4 * c * c + heads * blocks * size * size * (m + d) + sums + favor


def _local(args, side: str, frames: int, step: bool) -> int:
    """Local attention on ``frames`` frames (C channels, blocks of L): q, k, v and out, 4 C^2 a frame; the frames
    padded to whole blocks, each query of them against a window of 2 L keys, QK^T and AV: 2 x 2 L C a padded frame.
    One decoding step: one query against the 2 L slots of its ring buffer, whatever the step."""
    c, block = getattr(args, f"{side}_embed_dim"), args.local_block
    padded = 1 if step else -(-frames // block) * block
    return frames * 4 * c * c + 2 * padded * 2 * block * c


def _synthesizer(mixer: str, c: int, queries: int, keys: int) -> int:
    """Synthesizer, ``queries`` against ``keys`` frames (C channels): values and out, 2 C^2 a query; the weights
    times the values, C a query-key pair. Dense also: the MLP's first layer, C^2 a query, and its second layer for
    the keys' positions only, C a query-key pair (H heads of D channels a logit each); random: a table look-up."""
    macs = queries * 2 * c * c + queries * keys * c
    return macs + (queries * c * c + queries * keys * c if mixer == "synthesizer_dense" else 0)


def _memory_compressed(args, side: str, frames: int) -> int:
    """Memory-compressed attention (encoder) on ``frames`` frames (C channels, stride s): q, k, v and out, 4 C^2 a
    frame; the two strided convolutions over the frames padded to whole windows, C^2 a padded frame each (C x C x s
    taps per slot); each query against the ceil(T / s) slots, QK^T and AV: 2 C a query-slot pair."""
    c, stride = getattr(args, f"{side}_embed_dim"), args.compress_stride
    slots = -(-frames // stride)
    return frames * 4 * c * c + 2 * slots * stride * c * c + 2 * frames * slots * c


def _strided(args, side: str, queries: int, keys: int, step: bool) -> int:
    """Strided attention (C channels in H heads of D, stride s): q, k, v and out, 4 C^2 a query. Full pass on T
    frames: the H - H // 2 local heads, each query against a window of 2 s - 1 keys (decoder: s), QK^T and AV; the
    H // 2 strided heads on the frames padded to G = ceil(T / s) rows, each padded frame against the G frames of its
    column. One decoding step: one query against the t cached frames on every head (the patterns are masks)."""
    c, heads, stride = getattr(args, f"{side}_embed_dim"), getattr(args, f"{side}_attention_heads"), args.stride
    d = c // heads
    if step:
        return 4 * c * c + 2 * keys * c
    window = stride if side == "decoder" else 2 * stride - 1
    rows = -(-queries // stride)
    local, strided = heads - heads // 2, heads // 2
    return queries * 4 * c * c + 2 * queries * window * d * local + 2 * rows * stride * rows * d * strided


def _longformer(args, side: str, queries: int, keys: int, step: bool) -> int:
    """Longformer attention (C channels, window w on each side, g global tokens): q, k, v and out, 4 C^2 a query.
    Full pass on T frames: each query against its window of 2 w + 1 keys (decoder: w + 1) and the g global keys, QK^T
    and AV: 2 C a query-key pair; the encoder's g global queries also against all T keys. One decoding step: one query
    against the t cached frames (the pattern is a mask)."""
    c, w, g = getattr(args, f"{side}_embed_dim"), args.longformer_window, args.longformer_global
    if step:
        return 4 * c * c + 2 * keys * c
    window = w + 1 if side == "decoder" else 2 * w + 1
    global_queries = 0 if side == "decoder" else g
    return queries * 4 * c * c + 2 * queries * (window + g) * c + 2 * global_queries * keys * c


def _bigbird(args, side: str, frames: int) -> int:
    """BigBird attention (encoder) on ``frames`` frames (C channels): q, k, v and out, 4 C^2 a frame; the pattern
    (window, global tokens, random keys) is a mask on the dense T x T logits, so QK^T and AV cost 2 C a query-key pair
    over all T^2 pairs, as in standard attention."""
    c = getattr(args, f"{side}_embed_dim")
    return frames * 4 * c * c + 2 * frames * frames * c


def _isab(args, side: str, frames: int) -> int:
    """ISAB (encoder) on ``frames`` frames (C channels, m inducing points): the frames' q, k, v and out, 4 C^2 a frame;
    the inducing points' queries and the summaries' keys and values, 3 C^2 a point (the inner attention has no output
    projection); the m x T attention of the points to the frames and the T x m attention of the frames to the
    summaries, QK^T and AV: 2 C a point-frame pair each."""
    c, m = getattr(args, f"{side}_embed_dim"), args.isab_inducing_points
    return frames * 4 * c * c + m * 3 * c * c + 2 * 2 * m * frames * c
def _routing(args, side: str, queries: int, keys: int, step: bool) -> int:
    """Routing attention (C channels, c centroids a head): q, k, v and out, 4 C^2 a query; each query's and each key's
    distances to the c centroids of its head, D a centroid over H heads: c C a vector, 2 c C a frame; the cluster
    pattern is a mask on the dense logits, so QK^T and AV cost 2 C a query-key pair over all pairs, as in standard
    attention (the full T x T in the causal pass; one decoding step: one query against the t cached keys)."""
    c, clusters = getattr(args, f"{side}_embed_dim"), args.routing_clusters
    return queries * 4 * c * c + 2 * queries * clusters * c + 2 * queries * keys * c
def _sinkhorn(args, side: str, queries: int, keys: int, step: bool) -> int:
    """Sparse Sinkhorn attention (C channels, blocks of b): q, k, v and out, 4 C^2 a query; the SortNet, W_s on the N
    block (decoder: earlier-block mean) embeddings, C^2 a block, and the N x N bilinear scores, C a pair. Full pass on
    T frames, N = ceil(T / b): the sorted keys and values, P times the blocks' b C channels, N^2 b C each; each padded
    frame's query against its 2 b keys (its block and its sorted block, causal or not), QK^T and AV: 2 x 2 b C. One
    decoding step with t frames cached, N = ceil(t / b): the SortNet for the current block's row only, W_s on the
    earlier blocks' mean, C^2, and its scores against the N blocks, N C; that row of P times the blocks, 2 N b C, and
    the query against 2 b keys. The K Sinkhorn iterations (logsumexp, subtraction), the block sums and the mean are
    additions, exponentials and one division: no MACs."""
    c, block = getattr(args, f"{side}_embed_dim"), args.sinkhorn_block
    blocks = -(-keys // block)
    if step:
        return 4 * c * c + c * c + blocks * c + 2 * blocks * block * c + 2 * 2 * block * c
    sortnet = blocks * c * c + blocks * blocks * c
    return queries * 4 * c * c + sortnet + 2 * blocks * blocks * block * c + 2 * blocks * block * 2 * block * c
def _poolingformer(args, side: str, frames: int) -> int:
    """Poolingformer attention (encoder) on T ``frames`` frames (C channels, first window w1, second window w2, pools
    of k): q, k, v of the input and q', k', v' of the first level's output, 3 C^2 a frame each, and out, C^2 a frame;
    level 1, each query against its 2 w1 + 1 window keys, QK^T and AV: 2 C a query-key pair; the pooling, the frames
    padded to G = ceil(T / k) whole pools, k taps a pool summed for the keys and for the values: 2 C a padded frame;
    level 2, each query against the ceil(2 w2 / k) + 1 pools a window of 2 w2 + 1 positions can touch: 2 C a
    query-pool pair."""
    c, w1, w2, k = (getattr(args, f"{side}_embed_dim"), args.poolingformer_window, args.poolingformer_pool_window,
                    args.poolingformer_pool)
    padded = -(-frames // k) * k
    pools = -(-2 * w2 // k) + 1
    return frames * 7 * c * c + 2 * frames * (2 * w1 + 1) * c + 2 * padded * c + 2 * frames * pools * c
def _reformer(args, side: str, queries: int, keys: int, step: bool) -> int:
    """Reformer's LSH attention (C channels in H heads, n buckets, R rounds, chunks of c): qk, v and out (shared QK),
    3 C^2 a query; the hash, x A with A [D, R n/2] on every head, C R n / 2 a query. Encoder, T frames sorted into
    G = ceil(T / c) chunks of c (the last padded) in each round: each chunk's c queries against 2 c keys, QK^T and AV,
    4 R G c^2 C. Decoder, full pass: the T x T logits once and the combined weights times V (the bucket pattern is a
    mask), 2 T^2 C; one step: one query against the t cached frames, 2 t C. R > 1 rounds add their combination, a
    product summed over the rounds: the encoder's outputs, R T C; the decoder's weights, H R T^2 (a step: H R t)."""
    c, heads = getattr(args, f"{side}_embed_dim"), getattr(args, f"{side}_attention_heads")
    n, rounds, size = args.reformer_buckets, args.reformer_hashes, args.reformer_chunk
    combine = rounds > 1
    projections = queries * (3 * c * c + c * rounds * n // 2)
    if step:
        return projections + 2 * keys * c + combine * heads * rounds * keys
    if side == "decoder":
        return projections + 2 * queries * keys * c + combine * heads * rounds * queries * keys
    chunks = -(-queries // size)
    return projections + 4 * rounds * chunks * size * size * c + combine * rounds * queries * c


def reference_paper_macs(args, src_len: int, tgt_len: int) -> tuple[int, int]:
    """(encoder, decoder) MACs, teacher forcing, the full T x T attention matrix, no embeddings/projection."""
    ce, cd = args.encoder_embed_dim, args.decoder_embed_dim
    encoder = sum(_mixer(args, "encoder", src_len, src_len, k) + 2 * src_len * ce * args.encoder_ffn_embed_dim
                  for k in _kernels(args, "encoder"))
    cross = 2 * tgt_len * cd * cd + 2 * src_len * ce * cd + 2 * tgt_len * src_len * cd  # q+out, k+v, QK^T+AV
    decoder = sum(_mixer(args, "decoder", tgt_len, tgt_len, k) + cross + 2 * tgt_len * cd * args.decoder_ffn_embed_dim
                  for k in _kernels(args, "decoder"))
    return encoder, decoder


def reference_decode_macs(args, src_len: int, tgt_len: int, beam: int, vocab: int) -> tuple[int, int, int]:
    """(encoder once, decoder steps, output projection) for incremental decoding on ``beam`` hypotheses."""
    ce, cd = args.encoder_embed_dim, args.decoder_embed_dim
    encoder, _ = reference_paper_macs(args, src_len, tgt_len)
    decoder = 0
    for k in _kernels(args, "decoder"):
        decoder += beam * 2 * src_len * ce * cd  # cross-attention keys/values of the memory, at step 1 only
        for t in range(1, tgt_len + 1):  # step t attends to t cached positions
            decoder += beam * (_mixer(args, "decoder", 1, t, k, step=True) + 2 * cd * cd + 2 * src_len * cd
                               + 2 * cd * args.decoder_ffn_embed_dim)
    return encoder, decoder, tgt_len * beam * cd * vocab


def test_reference_reproduces_the_paper():
    """The hand count alone gives the paper's figures: the protocol is understood, whatever the counter does."""
    for arch, expected in PAPER_MACS.items():
        assert sum(reference_paper_macs(arch_args(arch), 30, 30)) == pytest.approx(expected, rel=0.001), arch


# ------------------------------------------------------------------------------------ the counter

@pytest.mark.parametrize("arch", sorted(PAPER_MACS))
def test_paper_macs_and_params(arch):
    model = build_arch(arch, vocab_size=100)
    measured = macs.paper_macs(model, 30, 30)
    assert measured.total == pytest.approx(PAPER_MACS[arch], rel=0.01)
    assert (measured.encoder, measured.decoder) == reference_paper_macs(model.args, 30, 30)
    if arch in PAPER_PARAMS_NO_EMBED:
        assert macs.count_params(model)[1] == pytest.approx(PAPER_PARAMS_NO_EMBED[arch], rel=0.01)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_hand_count_on_tiny_model(arch):
    model = tiny_model(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paper = macs.paper_macs(model, src_len=7, tgt_len=5)
        decode = macs.decode_macs(model, src_len=7, tgt_len=6, beam=3, every_step=True)
    assert not [w for w in caught if "not counted" in str(w.message)]  # every operator is known
    args = arch_args(arch, **TINY)
    assert (paper.encoder, paper.decoder) == reference_paper_macs(args, 7, 5)
    assert (decode.encoder, decode.decoder, decode.output_projection) == \
        reference_decode_macs(args, 7, 6, beam=3, vocab=len(model.decoder.dictionary))


GAU_FASTFORMER_ARCHS = [("flash_quad_100m", {}),
                        ("flash_100m", {"chunk_size": 4}),  # 7 and 5 frames: a padded chunk
                        ("fastformer_100m", {})]


@pytest.mark.parametrize("arch,overrides", GAU_FASTFORMER_ARCHS)
def test_hand_count_gau_and_fastformer_tiny(arch, overrides):
    model = tiny_model(arch, **overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paper = macs.paper_macs(model, src_len=7, tgt_len=5)
    assert not [w for w in caught if "not counted" in str(w.message)]  # every operator is known
    assert (paper.encoder, paper.decoder) == reference_paper_macs(model.args, 7, 5)


@pytest.mark.parametrize("overrides", [dict(reformer_hashes=3, reformer_chunk=3, reformer_buckets=4),
                                       dict(reformer_hashes=2, reformer_chunk=16)])
def test_hand_count_reformer_rounds_and_chunks(overrides):
    """Reformer beyond its preset: several hash rounds (their combination counted), chunks shorter and longer than
    the sentence."""
    model = tiny_model("reformer_100m", **overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paper = macs.paper_macs(model, src_len=7, tgt_len=5)
        decode = macs.decode_macs(model, src_len=7, tgt_len=6, beam=3, every_step=True)
    assert not [w for w in caught if "not counted" in str(w.message)]
    args = arch_args("reformer_100m", **TINY, **overrides)
    assert (paper.encoder, paper.decoder) == reference_paper_macs(args, 7, 5)
    assert (decode.encoder, decode.decoder, decode.output_projection) == \
        reference_decode_macs(args, 7, 6, beam=3, vocab=len(model.decoder.dictionary))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_decode_shortcut_equals_every_step(arch):
    model = tiny_model(arch)
    for beam in (1, 4):
        assert macs.decode_macs(model, 5, 9, beam) == macs.decode_macs(model, 5, 9, beam, every_step=True)


def test_params_count_tied_embeddings_once():
    model = tiny_model("lsra_wmt_200")
    total, no_embed = macs.count_params(model)
    embedding = model.encoder.embed_tokens.weight
    assert model.decoder.output_projection.weight is embedding
    assert total - no_embed == embedding.numel()
    untied = tiny_model("lsra_wmt_200", share_all_embeddings=False, share_decoder_input_output_embed=False)
    total, no_embed = macs.count_params(untied)
    assert total - no_embed == 3 * embedding.numel()  # source, target and output tables


# ------------------------------------------------------------------------------------ FlopCounterMode

def _flop_counter_macs(module, inputs) -> int:
    # torch 2.13's FlopCounterMode has no formula for CPU's fused attention kernel: give it torch's own
    # (unwrapped: FlopCounterMode wraps custom formulas in its shape wrapper itself)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_flop_counter_agrees_but_for_dynamic_conv_taps_and_favor_norms(arch):
    model, src_len, tgt_len = tiny_model(arch), 7, 5
    source, target = torch.randn(src_len, 1, 16), torch.randn(tgt_len, 1, 16)
    mask = torch.zeros(1, src_len, dtype=torch.bool)
    args = arch_args(arch, **TINY)
    # DynamicConv's taps are a broadcast mul + sum, no matmul kernel: FlopCounterMode does not see them
    conv = 16 - 16 // 2  # the LSRA conv branch's channels
    dynamic = args.encoder_mixer == "lsra" and args.conv_type == "dynamic"
    taps = (conv * src_len * sum(_kernels(args, "encoder")), conv * tgt_len * sum(_kernels(args, "decoder"))) \
        if dynamic else (0, 0)
    if args.decoder_mixer == "performer":  # FAVOR+'s |x|^2 of q and k: a mul + sum (2 C a frame), which
        # FlopCounterMode misses
        taps = (args.encoder_layers * src_len * 2 * 16, args.decoder_layers * tgt_len * 2 * 16)
    for stack, inputs, missed in [(macs.EncoderLayers(model.encoder), (source, mask), taps[0]),
                                  (macs.DecoderLayers(model.decoder), (target, source, mask), taps[1])]:
        assert macs.count_macs(stack, inputs) - _flop_counter_macs(stack, inputs) == missed


# ------------------------------------------------------------------------------------ budget presets

def _budget_presets() -> list[tuple[str, int]]:
    found = []
    for arch in lite_archs():
        match = re.fullmatch(r".+_(\d+)([mg])", arch)
        if match:
            found.append((arch, int(match.group(1)) * {"m": 10**6, "g": 10**9}[match.group(2)]))
    return found


def test_budget_registry_names_registered_presets():
    presets = dict(_budget_presets())
    assert {"lsra_100m", "lsra_500m", "transformer_100m", "transformer_500m"} <= set(presets)
    assert set(BUDGET_PRESETS) <= set(FAMILIES)
    for family, by_budget in BUDGET_PRESETS.items():
        for budget, arch in by_budget.items():
            assert presets.get(arch) == budget, f"{family}: {arch} is not registered or not named for {budget}"


@pytest.mark.parametrize("arch,budget", _budget_presets())
def test_budget_preset_fits_its_budget(arch, budget):
    model = build_arch(arch, vocab_size=100)
    measured = macs.paper_macs(model)
    # the count itself, by hand: GAU (FLASH-Quad, FLASH) and Fastformer presets as well as LSRA and attention
    assert (measured.encoder, measured.decoder) == reference_paper_macs(model.args, 30, 30)
    total = measured.total
    assert 0.9 * budget <= total <= budget, f"{arch}: {total:,} MACs, outside [0.9, 1] x {budget:,}"


def test_propose_dim_gives_the_preset(capsys):
    assert _lite_macs(["--family", "transformer", "--budget", "100M", "--json"]) == 0
    proposal = json.loads(capsys.readouterr().out)
    assert proposal["embed_dim"] == arch_args("transformer_100m").encoder_embed_dim == 136
    assert proposal["macs"] <= 100 * M < family_macs("transformer", 136 + FAMILIES["transformer"].multiple)


@pytest.mark.parametrize("text,value", [("100M", 10**8), ("0.5G", 5 * 10**8), ("90000000", 9 * 10**7),
                                        ("500k", 5 * 10**5)])
def test_parse_budget(text, value):
    assert parse_budget(text) == value


# ------------------------------------------------------------------------------------ CLI

def _lite_macs(argv: list[str]) -> int:
    """``lite macs ARGV`` in this process, the macs group alone; errors propagate (``lite.cli.main`` maps them)."""
    parser = argparse.ArgumentParser(prog="lite")
    macs_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["macs", *argv])
    return args.func(args)


def test_cli_json(capsys):
    assert _lite_macs(["--arch", "transformer_d128", "--src-len", "6", "--tgt-len", "5", "--vocab-size", "50",
                       "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for field in ("macs", "params", "params_no_embed", "decode_macs_beam1", "decode_macs_beam4"):
        assert isinstance(result[field], int), field
    args = arch_args("transformer_d128")
    assert result["macs"] == sum(reference_paper_macs(args, 6, 5))
    for beam in (1, 4):
        assert result[f"decode_macs_beam{beam}"] == sum(reference_decode_macs(args, 6, 5, beam, vocab=50))
    assert result["decode_macs_beam4"] > result["decode_macs_beam1"]
    assert result["bytes_fp32"] == 4 * result["params"]


def test_decode_includes_the_output_projection():
    model = tiny_model("lsra_wmt_200")
    vocab, dim = len(model.decoder.dictionary), 16
    one, four = (macs.decode_macs(model, 7, 6, beam) for beam in (1, 4))
    assert one.output_projection == 6 * dim * vocab and four.output_projection == 4 * 6 * dim * vocab
    assert four.total > one.total and one.encoder == four.encoder  # the encoder runs once either way


@pytest.mark.parametrize("argv,error,message", [
    (["--arch", "nope"], ModelArgsError, "not a lite_transformer architecture"),
    (["--family", "lsra"], macs.MacsError, "needs --budget"),
    (["--family", "nope", "--budget", "1M"], macs.MacsError, "valid families are"),
    (["--family", "lsra", "--budget", "1k"], macs.MacsError, "even lsra at d=8 needs"),
    (["--arch", "transformer_d128", "--budget", "1M"], macs.MacsError, "goes with --family")])
def test_cli_errors_name_the_option(argv, error, message):
    with pytest.raises(error, match=message) as raised:
        _lite_macs(argv)
    assert isinstance(raised.value, LiteError)  # `lite` prints it as one line, exit code 2


@pytest.mark.parametrize("argv,message", [
    (["--family", "lsra", "--budget", "0"], "argument --budget: '0': a budget must be > 0"),
    (["--family", "lsra", "--budget", "abc"], "argument --budget: 'abc': not a MAC count"),
    (["--arch", "transformer_d128", "--src-len", "0"], "argument --src-len: '0': must be an integer >= 1"),
    (["--arch", "nope"], "--arch 'nope' is not a lite_transformer architecture")])
def test_cli_bad_argument_is_one_line_exit_2(argv, message):
    out = run([*LITE, "macs", *argv], cwd=ROOT)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and [line for line in lines if "error:" in line] == lines[-1:]
    assert lines[-1].startswith("lite macs: error: ") and message in lines[-1]


def test_markdown_table():
    table = markdown_table(["transformer_d128"], src_len=4, tgt_len=3, vocab_size=20).splitlines()
    assert table[0].startswith("| `--arch` | MACs (4+3) |") and table[1].startswith("|---")
    assert table[2].startswith("| `transformer_d128` |")
    assert table[-1].endswith("Generated by `lite macs --markdown`.")


def test_cli_checkpoint(monkeypatch, capsys, tmp_path):
    import lite.checkpoint

    model = tiny_model("lsra_wmt_200")
    model.args.arch = "lsra_wmt_200"
    monkeypatch.setattr(lite.checkpoint, "load_model", lambda path, data=None: (model, None))
    assert _lite_macs(["--checkpoint", "any.pt", "--src-len", "5", "--tgt-len", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == "lsra_wmt_200" and result["vocab_size"] == len(model.decoder.dictionary)
    assert result["macs"] == sum(reference_paper_macs(arch_args("lsra_wmt_200", **TINY), 5, 4))
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="not found"):
        _lite_macs(["--checkpoint", str(tmp_path / "missing.pt")])
