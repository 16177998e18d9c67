"""Sparse Sinkhorn attention: fast path (blocks, the SortNet's permutation balanced by Sinkhorn, each query against its
block and its sorted block) vs the one-query-one-head-at-a-time reference, the balancing itself, the balancing and the
attention over own and sorted blocks vs sinkhorn-transformer's, stepping (cached keys/values/frames) vs the full causal
pass, beams, padding, blocks counted from the first real token, bad options."""
import math

import pytest
import torch
from sinkhorn_transformer.sinkhorn_transformer import SinkhornAttention as PackageAttention
from sinkhorn_transformer.sinkhorn_transformer import sinkhorn_sorting_operator
from torch import Tensor, nn

from lite.modules import CAUSAL_MIXERS, MixerSpec
from lite.modules.sinkhorn_attention import STATE_NAMES, SinkhornAttention, sinkhorn, sinkhorn_attention_from_spec
from tests.conftest import assert_close, left_padding, tiny_model
from tests.lite.mixer_checks import (assert_padded_frames_do_not_leak, assert_reorder_follows_beams,
                                      assert_stepping_matches_full_pass)

BLOCK, ITERATIONS, TEMPERATURE = 3, 5, 0.75


def make_unit(causal: bool, block: int = BLOCK, iterations: int = ITERATIONS, temperature: float = TEMPERATURE,
              embed_dim: int = 16, heads: int = 4) -> SinkhornAttention:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform (and P from a hard
    permutation: see test_the_permutation_is_soft_and_balanced)."""
    unit = SinkhornAttention(embed_dim, heads, block, iterations, temperature, causal=causal).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.out_proj, unit.sort):
            linear.weight.normal_(0.0, 0.3)
            if linear.bias is not None:
                linear.bias.normal_(0.0, 0.1)
    return unit


def spec(**fields) -> MixerSpec:
    return MixerSpec(**{"embed_dim": 16, "attention_heads": 4, "causal": False, "kernel_size": 3,
                        "conv_type": "lightweight", "conv_heads": 2, "conv_glu": True, "weight_softmax": True,
                        "weight_dropout": 0.0, "attention_dropout": 0.0, **fields})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 13, 33])  # below, at (b = 3) and above one block; many blocks
def test_fast_path_matches_reference(causal, length):
    unit = make_unit(causal)
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(5, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block,iterations,temperature", [(1, 1, 1.0), (2, 3, 0.5), (4, 5, 0.75), (5, 8, 2.0)])
def test_other_blocks_iterations_and_temperatures_match_reference(causal, block, iterations, temperature):
    unit = make_unit(causal, block=block, iterations=iterations, temperature=temperature)
    x = torch.randn(17, 2, 16)
    mask = left_padding(2, 17, pads=4)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_sinkhorn_balances_rows_and_columns():
    """Encoder: many iterations on an unmasked matrix make P doubly stochastic; masked entries are exactly zero and a
    masked block's row and column stay out. Causal: P is strictly lower triangular; the last round normalizes entry
    (i, j) by column j's rows up to i, so the first row of each column, i = j + 1, holds 1 (the balancing's limit
    under the causal mask is the shifted identity: a lower-triangular doubly stochastic matrix is one) and the others
    less; row i depends on rows up to i only (changing row 3's scores leaves rows 0..2 of P as they were)."""
    logits = torch.randn(2, 5, 5) * 2
    valid = torch.tensor([[True] * 5, [True, True, True, False, True]])
    mask = valid.unsqueeze(2) & valid.unsqueeze(1)
    p = torch.exp(sinkhorn(logits, mask, 200, causal=False))
    assert_close(p[0].sum(0), torch.ones(5), atol=1e-4, rtol=0)
    assert_close(p[0].sum(1), torch.ones(5), atol=1e-4, rtol=0)
    assert (p[1, 3] == 0).all() and (p[1, :, 3] == 0).all()
    assert_close(p[1].sum(1)[[0, 1, 2, 4]], torch.ones(4), atol=1e-4, rtol=0)
    index = torch.arange(5)
    causal_mask = (index.unsqueeze(1) > index).expand(2, 5, 5)
    p = torch.exp(sinkhorn(logits, causal_mask, 5, causal=True))
    assert (p[:, 0] == 0).all() and (p.triu() == 0).all()
    assert_close(torch.diagonal(p, offset=-1, dim1=1, dim2=2), torch.ones(2, 4))
    further = index.unsqueeze(1) >= index + 2  # the blocks before the previous one
    assert (p[:, further] > 0).all() and (p[:, further] < 1).all()
    changed = logits.clone()
    changed[:, 3] += torch.randn(5)
    moved = torch.exp(sinkhorn(changed, causal_mask, 5, causal=True))
    assert torch.equal(moved[:, :3], p[:, :3])
    assert (moved[:, 3] - p[:, 3]).abs().max() > 1e-3


def test_reference_is_the_textbook_mechanism():
    """C = H = 1, b = 1 (every frame a block), W_q = 0 (uniform attention weights), W_v = W_o = 1, W_s = 1,
    x = (1, 2): e = (1, 2), R = e e^T = [[1, 2], [2, 4]], tau = 1, one Sinkhorn round computed by hand; a frame averages
    itself and its sorted value P[i, 0] 1 + P[i, 1] 2."""
    x = torch.tensor([1.0, 2.0]).view(2, 1, 1)
    unit = SinkhornAttention(1, 1, 1, 1, 1.0, causal=False).eval()
    with torch.no_grad():
        unit.qkv.weight.copy_(torch.tensor([[0.0], [0.0], [1.0]]))
        unit.qkv.bias.zero_()
        unit.out_proj.weight.fill_(1.0)
        unit.out_proj.bias.zero_()
        unit.sort.weight.fill_(1.0)
    r = [[1.0, 2.0], [2.0, 4.0]]
    rows = [[math.exp(a) / sum(math.exp(c) for c in row) for a in row] for row in r]
    p = [[rows[i][j] / (rows[0][j] + rows[1][j]) for j in range(2)] for i in range(2)]
    want = torch.tensor([(1 + p[0][0] + 2 * p[0][1]) / 2, (2 + p[1][0] + 2 * p[1][1]) / 2]).view(2, 1, 1)
    assert_close(unit.reference_forward(x), want)
    assert_close(unit(x), want)


def test_the_permutation_is_soft_and_balanced():
    """The test units' P is neither uniform nor a hard permutation (so the parity tests see real mixtures), and its
    columns sum to about 1 after K = 5 rounds."""
    unit = make_unit(causal=False)
    x = torch.randn(18, 1, 16).transpose(0, 1)  # 6 blocks
    embeddings = x.view(1, 6, BLOCK, 16).sum(2)
    p = unit.permutation(embeddings, torch.ones(1, 6, dtype=torch.bool))[0]
    assert 0.05 < p.max(1).values.min() and p.max() < 0.99
    assert (p.max(1).values - p.min(1).values).max() > 0.1
    assert_close(p.sum(0), torch.ones(6), atol=0.05, rtol=0)


@pytest.mark.parametrize("iterations,temperature", [(1, 1.0), (ITERATIONS, TEMPERATURE), (8, 2.0)])
def test_sinkhorn_normalization_matches_sinkhorn_transformer(iterations, temperature):
    """The encoder's P is sinkhorn-transformer's ``sinkhorn_sorting_operator`` (lucidrains: K rounds of row then column
    logsumexp normalization in log space, then exp) on the same logits R / tau. Only the balancing is compared, R is
    ours: the package's sort nets feed the operator other logits (R per head from the bucket means of q and k, then
    log(relu(R) + 1e-6) plus Gumbel noise, divided by tau; ours one bilinear R for all heads from the input's block
    sums, no noise), and its causal sort net uses no Sinkhorn (a differentiable top-k over earlier buckets). A block of
    pads only, which ours leaves out of the balancing, gets the package's balancing of the other blocks' submatrix and
    zero in its row and column."""
    unit = make_unit(causal=False, iterations=iterations, temperature=temperature)
    embeddings = torch.randn(2, 5 * BLOCK, 16).view(2, 5, BLOCK, 16).sum(2)  # [B, N, C]: 5 blocks' frame sums
    scores = unit.sort(embeddings) @ embeddings.transpose(1, 2) / (BLOCK * math.sqrt(16))  # R [B, N, N]
    p = unit.permutation(embeddings, torch.ones(2, 5, dtype=torch.bool))  # [B, N, N]
    assert_close(p, sinkhorn_sorting_operator(scores / temperature, iterations))
    kept = torch.tensor([0, 1, 2, 4])  # block 3 holds pads only
    p = unit.permutation(embeddings, (torch.arange(5) != 3).expand(2, 5))
    expected = torch.zeros(2, 5, 5)
    expected[:, kept[:, None], kept] = sinkhorn_sorting_operator(scores[:, kept[:, None], kept] / temperature,
                                                                 iterations)
    assert_close(p, expected)


class GivenPermutation(nn.Module):
    """The package's sort net replaced by a given P [B H, N, N] (batch and heads merged, batch major)."""

    def __init__(self, p: Tensor):
        super().__init__()
        self.p = p

    def forward(self, q: Tensor, k: Tensor, topk: int = 1) -> Tensor:
        return self.p


@pytest.mark.parametrize("length", [BLOCK, 4 * BLOCK, 11 * BLOCK])
def test_attention_over_own_and_sorted_blocks_matches_sinkhorn_transformer(length):
    """Given our P, the encoder is sinkhorn-transformer's ``SinkhornAttention`` (lucidrains) on our heads' q, k, v,
    then our out_proj: block i's queries attend, in one softmax of q . k / sqrt(D), to the block's own keys and the
    sorted keys sum_j P[i, j] k_j. P (one for all heads) stands in for the package's sort net, whose logits differ
    (see the normalization test). Bridged: the package (0.11.4) takes the sorted keys for the sorted values
    (``b_v_r = b_k_r.reshape(...)`` outside its n_sortcut branch), so here v = k (W_v, b_v set to W_k, b_k): the
    comparison cannot see the sorted values' own weights, which the reference test checks. Not compared: padding
    (the package masks a sorted block by its largest-weight block's mask, a hard choice; ours mixes zero keys and
    values at pads and hides sorted slot s when the sentence is shorter than s + 1), lengths that are not a multiple
    of b (the package refuses them), and the causal form (the package's causal unit rotates half the heads by b - 1,
    ranks earlier buckets by a differentiable top-k and adds learned null keys; ours balances P under a causal
    mask)."""
    unit = make_unit(causal=False)
    with torch.no_grad():
        unit.qkv.weight[32:].copy_(unit.qkv.weight[16:32])  # W_v = W_k: rows q, k, v of 16 each
        unit.qkv.bias[32:].copy_(unit.qkv.bias[16:32])
    x = torch.randn(length, 2, 16)  # [T, B, C]
    blocks = length // BLOCK
    embeddings = x.transpose(0, 1).reshape(2, blocks, BLOCK, 16).sum(2)  # [B, N, C]
    p = unit.permutation(embeddings, torch.ones(2, blocks, dtype=torch.bool))  # [B, N, N]
    theirs = PackageAttention(BLOCK, 16, 4, 4, length).eval()  # b, C, D, H, the maximum length
    theirs.sort_net = GivenPermutation(p.unsqueeze(1).expand(2, 4, blocks, blocks).reshape(8, blocks, blocks))
    q, k, v = (t.transpose(1, 2) for t in unit._heads(x.transpose(0, 1)))  # [B, H, T, D]
    expected = unit.out_proj(theirs(q, k, v).transpose(1, 2).flatten(2))  # [B, T, C]
    assert_close(unit(x), expected.transpose(0, 1))


@pytest.mark.parametrize("causal", [False, True])
def test_queries_see_their_block_and_the_sorted_blocks_only(causal):
    """Guard against a vacuous pattern: with P fixed by hand to the identity shifted by one (block i sorted next to
    block i - 1), query 7 (block 2 of blocks of 3) sees frames 6..8 (causal: 6..7) and block 1 (3..5); frames 0..2 and
    9..11 do not reach it. The real P, soft, reaches every earlier block (causal) or every block (encoder)."""
    unit = make_unit(causal)
    x = torch.randn(12, 1, 16)
    shifted = torch.eye(4).roll(-1, dims=1)  # P[i, i - 1] = 1 (P[0, 3] = 1 in the encoder)
    unit.permutation = lambda embeddings, valid: shifted.unsqueeze(0)
    base = unit(x)
    reach = {3, 4, 5, 6, 7} if causal else {3, 4, 5, 6, 7, 8}
    for frame in range(12):
        changed = x.clone()
        changed[frame] += 1.0
        assert ((unit(changed)[7] - base[7]).abs().max() > 1e-4) == (frame in reach), frame
    del unit.permutation  # the SortNet's own, soft P
    base = unit(x)
    for frame in range(12):
        changed = x.clone()
        changed[frame] += 1.0
        assert ((unit(changed)[7] - base[7]).abs().max() > 1e-6) == (frame <= 7 or not causal), frame


def test_the_causal_form_does_not_look_ahead():
    """Changing a frame changes no output before it (the permutation, too, reads earlier blocks only)."""
    unit = make_unit(causal=True)
    x = torch.randn(20, 2, 16)
    base = unit(x)
    for frame in (0, 4, 9, 13, 19):
        changed = x.clone()
        changed[frame] += 1.0
        moved = unit(changed)
        assert_close(moved[:frame], base[:frame])
        assert (moved[frame] - base[frame]).abs().max() > 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_blocks_count_from_the_first_real_token(causal):
    """Left padding moves the blocks with the sentence: a padded sentence gives the outputs it gives alone."""
    unit = make_unit(causal)
    x = torch.randn(12, 2, 16)
    mask = left_padding(2, 12, pads=5)
    assert_close(unit(x, mask)[5:, 1], unit(x[5:, 1:2])[:, 0])


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 10, 33])
def test_stepping_matches_full_causal_pass(length):
    assert_stepping_matches_full_pass(make_unit(causal=True), length)


@pytest.mark.parametrize("length", [2, 9, 23])
def test_stepping_with_left_padding_matches_full_pass(length):
    assert_stepping_matches_full_pass(make_unit(causal=True), length, pads=min(5, length - 1))


def test_reorder_incremental_state_follows_beams():
    assert_reorder_follows_beams(make_unit(causal=True), reorder_at=7)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_frames_do_not_leak(causal):
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero."""
    unit = make_unit(causal)
    x, mask, y = assert_padded_frames_do_not_leak(unit)
    assert_close(y, unit.reference_forward(x, mask))


def test_state_is_the_cached_frames_and_the_column_sums():
    """O(t): keys, values, input frames and each round's column sums, one slot a step (a pad's step too, written
    nowhere); the column sums of the rows of whole blocks only (block i's row joins at its last frame)."""
    unit = make_unit(causal=True)
    state = {}
    mask = torch.tensor([[True, True, False, False, False, False, False], [False] * 7])  # [B, T]: row 0 left-padded
    low = torch.finfo(torch.float32).min
    for t in range(1, 8):
        unit(torch.randn(1, 2, 16), mask[:, t - 1:t], incremental_state=state)
        shapes = tuple(tuple(unit.get_incremental_state(state, name).shape) for name in STATE_NAMES)
        assert shapes == ((2, 4, t, 4), (2, 4, t, 4), (2, t, 16), (2, ITERATIONS, t), (2,))
        column = unit.get_incremental_state(state, "column")
        rows_done = [max(0, t - 2) // BLOCK, t // BLOCK]  # whole blocks so far; rows 0 and 1 hold no entry
        for b, done in enumerate(rows_done):
            assert ((column[b] > low / 2).sum(1) == max(0, done - 1)).all(), (t, b)  # columns j < done - 1
    assert unit.get_incremental_state(state, "count").tolist() == [5, 7]
    assert (unit.get_incremental_state(state, "frame")[0, 5:] == 0).all()  # slots past row 0's 5 real frames
    initial = unit.initial_state(5, torch.zeros(1))
    assert {slot: tuple(t.shape) for slot, t in initial.items()} == \
        {("key", None): (5, 4, 0, 4), ("value", None): (5, 4, 0, 4), ("frame", None): (5, 0, 16),
         ("column", None): (5, ITERATIONS, 0), ("count", None): (5,)}


def test_a_step_balances_its_row_alone():
    """The step never balances the whole P again (O(K N^2) and more a step): only the full pass calls
    ``permutation``; stepping still equals the full causal pass (the parity tests above)."""
    unit = make_unit(causal=True)
    x = torch.randn(11, 2, 16)
    full = unit(x)

    def refuse(*args):
        raise AssertionError("a decoding step balanced the whole permutation")
    unit.permutation = refuse
    state = {}
    assert_close(torch.cat([unit(x[t:t + 1], incremental_state=state) for t in range(11)]), full)


def test_the_encoder_form_refuses_incremental_state():
    with pytest.raises(ValueError, match="only for the causal"):
        make_unit(causal=False)(torch.randn(1, 1, 16), incremental_state={})


def test_builder_reads_the_spec():
    unit = sinkhorn_attention_from_spec(spec(causal=True, attention_dropout=0.1, sinkhorn_block=6,
                                             sinkhorn_iterations=3, sinkhorn_temperature=0.5))
    assert (unit.num_heads, unit.block, unit.iterations, unit.temperature, unit.causal, unit.dropout) == \
        (4, 6, 3, 0.5, True, 0.1)
    defaults = spec()
    assert (defaults.sinkhorn_block, defaults.sinkhorn_iterations, defaults.sinkhorn_temperature) == (4, 5, 0.75)
    assert "sinkhorn" in CAUSAL_MIXERS
    with pytest.raises(ValueError, match="divisible"):
        SinkhornAttention(10, 4, 2, 5, 0.75, causal=False)


@pytest.mark.parametrize("flag,values", [("--sinkhorn-block", (0, 5, 0.75)), ("--sinkhorn-iterations", (4, 0, 0.75)),
                                         ("--sinkhorn-temperature", (4, 5, 0.0)),
                                         ("--sinkhorn-temperature", (4, 5, -1.0))])
def test_bad_options_are_refused_naming_the_option(flag, values):
    with pytest.raises(ValueError, match=f"^sinkhorn attention: {flag} must be positive, got "):
        SinkhornAttention(16, 4, *values, causal=False)
    field = {"--sinkhorn-block": "sinkhorn_block", "--sinkhorn-iterations": "sinkhorn_iterations",
             "--sinkhorn-temperature": "sinkhorn_temperature"}[flag]
    value = values[("--sinkhorn-block", "--sinkhorn-iterations", "--sinkhorn-temperature").index(flag)]
    with pytest.raises(ValueError, match=f"{flag} must be positive"):
        tiny_model("sinkhorn_100m", **{field: value})


def test_the_preset_uses_it_on_both_sides():
    args = tiny_model("sinkhorn_100m").args
    assert (args.encoder_mixer, args.decoder_mixer, args.sinkhorn_block, args.sinkhorn_iterations,
            args.sinkhorn_temperature) == ("sinkhorn", "sinkhorn", 4, 5, 0.75)
