"""Reformer's LSH attention: fast paths (the encoder's sorted chunks, the decoder's causal bucket mask) vs the
one-query-one-head-one-round reference, the paper's hash and self rule, rounds combined by their logsumexp, stepping
(cached keys, values and buckets) vs the full causal pass, beams, padding, the rotations fixed at build time and kept
in the state dict, options refused by name, and reformer-pytorch's ``LSHAttention`` (hashing, one round and
several)."""
from contextlib import contextmanager

import pytest
import torch
from reformer_pytorch.reformer_pytorch import LSHAttention, LSHSelfAttention
from torch import Tensor

from lite.modules import CAUSAL_MIXERS, MixerSpec
from lite.modules.reformer import STATE_NAMES, ReformerAttention, random_rotations, reformer_attention_from_spec
from tests.conftest import assert_close, left_padding, tiny_model
from tests.lite.mixer_checks import (assert_padded_frames_do_not_leak, assert_reorder_follows_beams,
                                      assert_stepping_matches_full_pass)

BUCKETS, HASHES, CHUNK = 4, 2, 3
C, H, D = 16, 4, 4  # make_unit's sizes


def make_unit(causal: bool, buckets: int = BUCKETS, hashes: int = HASHES, chunk: int = CHUNK, embed_dim: int = 16,
              heads: int = 4) -> ReformerAttention:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform."""
    unit = ReformerAttention(embed_dim, heads, buckets, hashes, chunk, causal=causal).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    return unit


def spec(**fields) -> MixerSpec:
    return MixerSpec(**{"embed_dim": 16, "attention_heads": 4, "causal": False, "kernel_size": 3,
                        "conv_type": "lightweight", "conv_heads": 2, "conv_glu": True, "weight_softmax": True,
                        "weight_dropout": 0.0, "attention_dropout": 0.0, **fields})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 2, 3, 4, 6, 7, 13, 33])  # below, at and above the chunk (3), several chunks
def test_fast_path_matches_reference(causal, length):
    unit = make_unit(causal)
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(5, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("buckets,hashes,chunk", [(2, 1, 1), (2, 3, 2), (4, 1, 8), (8, 1, 8), (8, 2, 5), (16, 4, 4)])
def test_other_options_match_reference(causal, buckets, hashes, chunk):
    unit = make_unit(causal, buckets=buckets, hashes=hashes, chunk=chunk)
    x = torch.randn(19, 2, 16)
    mask = left_padding(2, 19, pads=4)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def textbook_unit(causal: bool) -> ReformerAttention:
    """C = H = D = 1, 2 buckets, chunks of 2, qk = v = x, W_o = 1, A = 1: positive frames hash to bucket 0, negative
    ones to 1, and within a bucket every logit x_i sign(x_j) is the same, so a query averages the values it sees."""
    unit = ReformerAttention(1, 1, 2, 1, 2, causal=causal).eval()
    with torch.no_grad():
        unit.qkv.weight.fill_(1.0)
        unit.qkv.bias.zero_()
        unit.out_proj.weight.fill_(1.0)
        unit.out_proj.bias.zero_()
        unit.rotations.fill_(1.0)
    return unit


def test_reference_is_the_textbook_pattern():
    """x = (1, -2, 4, -8, 16, 32). Encoder: sorted by (bucket, position) 0 2 | 4 5 | 1 3; frame 0 sees 2 (not
    itself), frame 4 sees 0, 2 and 5 (its chunk and the previous one), frame 1 sees 3 (chunk 1 holds no key of its
    bucket). Decoder: frame 0 sees only itself (nothing earlier), frame 1 too (no earlier negative frame), frame 4 sees
    0 and 2, frame 5 sees 0, 2 and 4."""
    x = torch.tensor([1.0, -2.0, 4.0, -8.0, 16.0, 32.0]).view(6, 1, 1)
    expected = {False: [4.0, -8.0, 1.0, -2.0, 37 / 3, 7.0], True: [1.0, -2.0, 1.0, -2.0, 2.5, 7.0]}
    for causal in (False, True):
        unit = textbook_unit(causal)
        want = torch.tensor(expected[causal]).view(6, 1, 1)
        assert_close(unit.reference_forward(x), want)
        assert_close(unit(x), want)


def test_the_hash_is_the_argmax_over_the_rotations_and_their_negation():
    unit = make_unit(causal=False, buckets=8, hashes=3)
    qk = torch.randn(50, unit.head_dim)
    rotated = torch.einsum("nd,drm->nrm", qk, unit.rotations)  # [50, R, n/2]
    want = torch.cat([rotated, -rotated], dim=-1).argmax(-1)
    assert torch.equal(unit._bucket(qk), want)
    assert want.unique().numel() == 8  # every bucket used
    assert [unit.reference_buckets(v) for v in qk] == want.tolist()
    assert torch.equal(unit._bucket(3.0 * qk), want)  # angular: the length of a vector does not move it


def test_queries_see_a_fraction_of_the_keys():
    """Guard against a vacuous pattern: 8 buckets, chunks of 4, 40 frames, one round: a query sees its bucket's keys
    in 2 chunks (at most 7 others), and the fast path agrees with the reference that says so."""
    for causal in (False, True):
        unit = make_unit(causal, buckets=8, hashes=1, chunk=4)
        x = torch.randn(40, 1, 16)
        qk = unit._heads(x[:, 0])[0]  # [T, H, D]
        frames = list(range(40))
        sizes = []
        for h in range(unit.num_heads):
            buckets = {j: unit.reference_buckets(qk[j, h]) for j in frames}
            for i in frames:
                keys = unit.reference_keys(buckets, frames, i, 0)
                assert all(buckets[j] == buckets[i] for j in keys)
                sizes.append(len(keys))
        assert max(sizes) <= (7 if not causal else 39) and sum(sizes) / len(sizes) < 6
        assert_close(unit(x), unit.reference_forward(x))


def test_one_chunk_is_all_of_the_bucket():
    """A chunk as long as the sentence: the encoder sees every same-bucket key, i.e. the causal form's mask
    without the causal limit."""
    unit = make_unit(causal=False, chunk=40)
    x = torch.randn(21, 1, 16)
    qk = unit._heads(x[:, 0])[0]
    frames = list(range(21))
    for h in range(unit.num_heads):
        buckets = {j: unit.reference_buckets(qk[j, h]) for j in frames}
        for i in frames:
            for r in range(HASHES):
                same = [j for j in frames if buckets[j][r] == buckets[i][r] and j != i]
                assert unit.reference_keys(buckets, frames, i, r) == (same or [i])


@pytest.mark.parametrize("causal", [False, True])
def test_identical_rounds_combine_to_one_round(causal):
    """The logsumexp weights of R identical rounds are 1 / R each: the output is one round's."""
    several, one = make_unit(causal, hashes=3), make_unit(causal, hashes=1)
    one.load_state_dict({k: t for k, t in several.state_dict().items() if k != "rotations"}, strict=False)
    with torch.no_grad():
        several.rotations.copy_(one.rotations.expand_as(several.rotations))
    x = torch.randn(15, 2, 16)
    mask = left_padding(2, 15, pads=3)
    assert_close(several(x, mask), one(x, mask))


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_changes_nothing(causal):
    """Buckets, the sort and the chunks of a sentence do not depend on the pads before it."""
    unit = make_unit(causal)
    x = torch.randn(17, 1, 16)
    padded = torch.cat([torch.randn(6, 1, 16), x])
    mask = torch.zeros(1, 23, dtype=torch.bool)
    mask[0, :6] = True
    assert_close(unit(padded, mask)[6:], unit(x))


@pytest.mark.parametrize("causal", [False, True])
def test_padded_frames_do_not_leak(causal):
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero."""
    unit = make_unit(causal)
    x, mask, y = assert_padded_frames_do_not_leak(unit)
    assert_close(y, unit.reference_forward(x, mask))


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 10, 33])
def test_stepping_matches_full_causal_pass(length):
    assert_stepping_matches_full_pass(make_unit(causal=True), length)


@pytest.mark.parametrize("hashes", [1, 3])
@pytest.mark.parametrize("length", [2, 9, 23])
def test_stepping_with_left_padding_matches_full_pass(hashes, length):
    assert_stepping_matches_full_pass(make_unit(causal=True, hashes=hashes), length, pads=min(5, length - 1))


def test_reorder_incremental_state_follows_beams():
    assert_reorder_follows_beams(make_unit(causal=True))


def test_state_is_the_cached_frames():
    """O(t): the keys, values and buckets of every frame so far."""
    unit = make_unit(causal=True)
    state = {}
    for t in range(1, 8):
        unit(torch.randn(1, 2, 16), incremental_state=state)
        shapes = tuple(tuple(unit.get_incremental_state(state, name).shape) for name in STATE_NAMES)
        assert shapes == ((2, 4, t, 4), (2, 4, t, 4), (2, 4, t, HASHES))
    initial = unit.initial_state(5, torch.zeros(1))
    assert {slot: tuple(t.shape) for slot, t in initial.items()} == \
        {("key", None): (5, 4, 0, 4), ("value", None): (5, 4, 0, 4), ("bucket", None): (5, 4, 0, HASHES)}


def test_the_rotations_are_fixed_and_saved():
    """Built twice, the same rotations (fixed seed); a buffer in the state dict, so a checkpoint restores them."""
    first, second = make_unit(causal=False), make_unit(causal=False)
    assert torch.equal(first.rotations, second.rotations)
    assert torch.equal(first.rotations, random_rotations(4, HASHES, BUCKETS))
    assert first.rotations.shape == (4, HASHES, BUCKETS // 2)
    other = make_unit(causal=False)
    with torch.no_grad():
        other.rotations.normal_()
    other.load_state_dict(first.state_dict())
    assert torch.equal(other.rotations, first.rotations)
    x = torch.randn(21, 2, 16)
    assert torch.equal(first(x), other(x))
    model = tiny_model("reformer_100m")
    assert sum(key.endswith("mixer.rotations") for key in model.state_dict()) == 4  # 2 encoder + 2 decoder layers


def test_the_encoder_form_refuses_incremental_state():
    with pytest.raises(ValueError, match="only for the causal"):
        make_unit(causal=False)(torch.randn(1, 1, 16), incremental_state={})


def test_builder_reads_the_spec():
    unit = reformer_attention_from_spec(spec(causal=True, attention_dropout=0.1, reformer_buckets=6,
                                             reformer_hashes=2, reformer_chunk=5))
    assert (unit.num_heads, unit.buckets, unit.hashes, unit.chunk, unit.causal, unit.dropout) == \
        (4, 6, 2, 5, True, 0.1)
    assert unit.qkv.out_features == 2 * 16  # shared QK: qk and v
    defaults = spec()
    assert (defaults.reformer_buckets, defaults.reformer_hashes, defaults.reformer_chunk) == (8, 1, 8)
    assert "reformer" in CAUSAL_MIXERS


@pytest.mark.parametrize("buckets,hashes,chunk,message", [
    (7, 1, 8, "--reformer-buckets must be even and >= 2 .*got 7"),
    (0, 1, 8, "--reformer-buckets must be even and >= 2 .*got 0"),
    (8, 0, 8, "--reformer-hashes must be >= 1, got 0"),
    (8, 1, 0, "--reformer-chunk must be >= 1, got 0")])
def test_bad_options_are_refused_by_name(buckets, hashes, chunk, message):
    with pytest.raises(ValueError, match=message) as error:
        ReformerAttention(16, 4, buckets, hashes, chunk, causal=False)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message):
        tiny_model("reformer_100m", reformer_buckets=buckets, reformer_hashes=hashes, reformer_chunk=chunk)
    with pytest.raises(ValueError, match="divisible"):
        ReformerAttention(10, 4, 8, 1, 8, causal=False)


def test_the_preset_uses_it_in_both_encoder_and_decoder():
    model = tiny_model("reformer_100m")
    args = model.args
    assert (args.encoder_mixer, args.decoder_mixer, args.reformer_buckets, args.reformer_hashes,
            args.reformer_chunk) == ("reformer", "reformer", 8, 1, 8)
    assert not model.encoder.layers[0].mixer.causal and model.decoder.layers[0].mixer.causal


@contextmanager
def our_rotations(monkeypatch, rotations: Tensor):
    """While open, reformer-pytorch's one random draw, ``torch.randn`` in ``LSHAttention.hash_vectors`` (shape
    [1, D, R, n/2]: one rotation for every head and batch row), returns ours, A [D, R, n/2]; another shape fails."""
    def randn(shape, dtype=None, device=None):
        assert tuple(shape) == (1, *rotations.shape)
        return rotations.to(dtype=dtype, device=device).unsqueeze(0)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn", randn)
        yield


def package_twin(unit: ReformerAttention, bucket_size: int) -> LSHSelfAttention:
    """reformer-pytorch's ``LSHSelfAttention`` (lucidrains) with the unit's weights, fed [x, 1] (C + 1 channels): its
    qk and v projections have no bias, so the constant channel's weight column holds ours; its first C outputs are
    ours. It cuts the sorted order into chunks of ``bucket_size`` and hashes into n = T / bucket_size buckets (ours:
    both options). ``attend_across_buckets=False`` hides other buckets' keys in a chunk, as ours; its default
    ``allow_duplicate_attention`` counts a key in several rounds once per round, as ours."""
    twin = LSHSelfAttention(C + 1, heads=H, dim_head=D, bucket_size=bucket_size, n_hashes=unit.hashes,
                            causal=unit.causal, attend_across_buckets=False).to(unit.qkv.weight.dtype).eval()
    with torch.no_grad():
        qk_weight, v_weight = unit.qkv.weight.chunk(2)  # [C, C] each
        qk_bias, v_bias = unit.qkv.bias.chunk(2)  # [C] each
        twin.toqk.weight.copy_(torch.cat([qk_weight, qk_bias.unsqueeze(1)], dim=1))  # [C, C + 1]
        twin.tov.weight.copy_(torch.cat([v_weight, v_bias.unsqueeze(1)], dim=1))
        twin.to_out.weight[:C] = unit.out_proj.weight  # [C + 1, C]: the first C rows
        twin.to_out.bias[:C] = unit.out_proj.bias
    return twin


def package_forward(monkeypatch, unit: ReformerAttention, bucket_size: int, x: Tensor) -> Tensor:
    """x [T, B, C] -> the package twin's output [T, B, C], hashed with the unit's rotations."""
    twin = package_twin(unit, bucket_size)
    inputs = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=-1).transpose(0, 1)  # [B, T, C + 1]
    with our_rotations(monkeypatch, unit.rotations):
        return twin(inputs)[..., :C].transpose(0, 1)


def test_hashing_matches_reformer_pytorch(monkeypatch):
    """The same vectors and rotations give the buckets of reformer-pytorch's ``LSHAttention.hash_vectors``: the
    argmax over [x A_r; -x A_r], A in the same layout. It returns [batch, R T], round r's buckets offset by r n (its
    rounds share one sort)."""
    unit = make_unit(causal=False, buckets=8, hashes=3)
    vectors = torch.randn(6, 50, D)  # [batch, T, D]: a package batch row is one head of one sentence
    with our_rotations(monkeypatch, unit.rotations):
        theirs = LSHAttention(n_hashes=3).hash_vectors(8, vectors).view(6, 3, 50)  # [batch, R, T]
    offsets = 8 * torch.arange(3).view(3, 1)  # [R, 1]
    assert torch.equal(theirs - offsets, unit._bucket(vectors).transpose(1, 2))
    assert theirs.unique().numel() == 24  # every bucket of every round used


@pytest.mark.parametrize("causal", [False, True])
def test_matches_reformer_pytorch_lsh_attention(monkeypatch, causal):
    """One round, 2 buckets, 16 frames. reformer-pytorch cuts the sorted order into 2 chunks of 8 and a chunk looks
    one back, chunk 0 to the last one (Trax's wrap-around), so each sees the other: a query sees every same-bucket
    key, as ours with one chunk of 16 (the encoder). Causal: the earlier same-bucket keys, as ours (unchunked): they
    sort before the query, in its chunk or the one before. Also alike: shared qk, normalized keys, the 1 / sqrt(D)
    scale, a query that sees itself only when it sees nothing else (there: a self logit of -5e4, above the masked
    ones). Sentences go unpadded: the package's pads are hashed and sorted among the real frames, taking chunk slots
    and counting in n = T / bucket_size."""
    unit = make_unit(causal, buckets=2, hashes=1, chunk=16)
    x = torch.randn(16, 2, C)  # [T, B, C]
    assert_close(unit(x), package_forward(monkeypatch, unit, 8, x))


def test_several_chunks_match_reformer_pytorch(monkeypatch):
    """One round, 6 buckets, 6 chunks of 4 (24 frames), as ours but for chunk 0, which looks back to the last chunk
    there (Trax's wrap-around) and to nothing here. That adds keys only where the first and last chunks share a
    bucket, which no head of these sentences does (asserted). Not compared: the causal form, chunked there (a query
    sees the earlier keys of its bucket in its chunk and the one before), unchunked here."""
    unit = make_unit(causal=False, buckets=6, hashes=1, chunk=4)
    x = torch.randn(24, 2, C)  # [T, B, C]
    bucket = unit._bucket(unit._heads(x)[0])[..., 0].sort(dim=0).values  # [T, B, H]: each head's, sorted
    assert (bucket[3] < bucket[-4]).all()  # chunk 0's buckets all below the last chunk's
    assert_close(unit(x), package_forward(monkeypatch, unit, 4, x))


@pytest.mark.parametrize("causal", [False, True])
def test_rounds_match_reformer_pytorch(monkeypatch, causal):
    """Three rounds. reformer-pytorch sorts them together, round r's buckets offset by r n, so a round's chunk 0
    looks back into the previous round's last chunk, of other bucket ids, hidden: its chunks are ours (encoder: 4
    buckets, chunks of 4, 16 frames; decoder: as in the one-round test). The rounds combine alike (a softmax over
    their logsumexps), but for a query alone (seeing only itself) in some rounds and not all: a round's logsumexp is
    the self logit here, -5e4 there, which drops the round. Our out_proj is the identity, so the output is the heads'
    and a (frame, head) is compared where its query is alone in no round or in all; the others differ (asserted).
    In float64: in float32 the package's logsumexps near -5e4 fall on steps of 0.004, which moves the rounds' weights
    of a query alone in all of them by up to 0.2%."""
    buckets, chunk, bucket_size = (2, CHUNK, 8) if causal else (4, 4, 4)
    unit = make_unit(causal, buckets=buckets, hashes=3, chunk=chunk).double()
    with torch.no_grad():
        unit.out_proj.weight.copy_(torch.eye(C))
        unit.out_proj.bias.zero_()
    x = torch.randn(16, 2, C, dtype=torch.float64)  # [T, B, C]
    ours, theirs = (y.view(16, 2, H, D) for y in (unit(x), package_forward(monkeypatch, unit, bucket_size, x)))
    qk = unit._heads(x)[0]  # [T, B, H, D]
    frames = list(range(16))
    alone = torch.zeros(16, 2, H, dtype=torch.long)  # [T, B, H]: the rounds in which the query sees only itself
    for b in range(2):
        for h in range(H):
            hashed = {j: unit.reference_buckets(qk[j, b, h]) for j in frames}
            for i in frames:
                alone[i, b, h] = sum(unit.reference_keys(hashed, frames, i, r) == [i] for r in range(3))
    same = (alone == 0) | (alone == 3)  # [T, B, H]
    assert_close(ours[same], theirs[same])
    assert same.float().mean() > 0.75 and ((ours - theirs)[~same].abs().amax(-1) > 1e-3).all()
