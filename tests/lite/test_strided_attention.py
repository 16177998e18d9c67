"""Strided attention (Sparse Transformer): fast path (a window of keys for the local heads, columns of positions mod s
for the strided heads) vs the one-query-one-head-at-a-time reference, stepping (cached keys/values) vs the full causal
pass, beams, padding."""
import pytest
import torch

from lite.modules import CAUSAL_MIXERS, MixerSpec
from lite.modules.strided_attention import STATE_NAMES, StridedAttention, strided_attention_from_spec
from tests.conftest import assert_close, left_padding
from tests.lite.mixer_checks import (assert_padded_frames_do_not_leak, assert_reorder_follows_beams,
                                      assert_stepping_matches_full_pass)

STRIDE = 3


def make_unit(causal: bool, stride: int = STRIDE, embed_dim: int = 16, heads: int = 4) -> StridedAttention:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform."""
    unit = StridedAttention(embed_dim, heads, stride, causal=causal).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    return unit


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 3, 7, 13, 33])
def test_fast_path_matches_reference(causal, length):
    unit = make_unit(causal)
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(5, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_odd_head_counts_split_local_first():
    unit = make_unit(causal=True, embed_dim=15, heads=3)
    assert unit.local_heads == 2
    x = torch.randn(11, 2, 15)
    mask = left_padding(2, 11, pads=4)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_pattern():
    """Stride 2, C = H = 2 (D = 1; head 0 local, head 1 strided), W_q = 0 (uniform weights), W_v = W_o = 1 on the
    diagonal: x = (1, 2, 4, 8, 16) on both channels. Encoder: channel 0 averages |i - j| < 2, channel 1 the frames of
    the query's parity; causal: the same, j <= i."""
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]).view(5, 1, 1).expand(5, 1, 2)
    expected = {False: ([1.5, 7 / 3, 14 / 3, 28 / 3, 12.0], [7.0, 5.0, 7.0, 5.0, 7.0]),
                True: ([1.0, 1.5, 3.0, 6.0, 12.0], [1.0, 2.0, 2.5, 5.0, 7.0])}
    for causal in (False, True):
        unit = StridedAttention(2, 2, 2, causal=causal).eval()
        with torch.no_grad():
            unit.qkv.weight.zero_()
            unit.qkv.bias.zero_()
            unit.qkv.weight[4:].copy_(torch.eye(2))  # W_v
            unit.out_proj.weight.copy_(torch.eye(2))
            unit.out_proj.bias.zero_()
        want = torch.tensor(expected[causal]).t().reshape(5, 1, 2)
        assert_close(unit.reference_forward(x), want)
        assert_close(unit(x), want)


def test_queries_see_their_patterns_only():
    """Guard against a vacuous pattern (stride 3, causal, query 9): frames 0, 3 and 6 reach it through the strided
    heads, 7 and 8 through the local heads; 1, 2, 4 and 5 through neither, so changing them changes nothing."""
    unit = make_unit(causal=True)
    x = torch.randn(10, 1, 16)
    base = unit(x)[9]
    for frame in range(9):
        changed = x.clone()
        changed[frame] += 1.0
        moved = (unit(changed)[9] - base).abs().max()
        if frame in (1, 2, 4, 5):
            assert moved < 1e-6, frame
        else:
            assert moved > 1e-4, frame


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 10, 33])
def test_stepping_matches_full_causal_pass(length):
    assert_stepping_matches_full_pass(make_unit(causal=True), length)


@pytest.mark.parametrize("length", [2, 9, 23])
def test_stepping_with_left_padding_matches_full_pass(length):
    assert_stepping_matches_full_pass(make_unit(causal=True), length, pads=min(5, length - 1))


def test_reorder_incremental_state_follows_beams():
    assert_reorder_follows_beams(make_unit(causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_padded_frames_do_not_leak(causal):
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero."""
    unit = make_unit(causal)
    assert_padded_frames_do_not_leak(unit)


def test_state_is_the_cached_frames():
    """O(t): the keys/values of every frame so far (the strided heads reach back to the first)."""
    unit = make_unit(causal=True)
    state = {}
    for t in range(1, 8):
        unit(torch.randn(1, 2, 16), incremental_state=state)
        shapes = tuple(tuple(unit.get_incremental_state(state, name).shape) for name in STATE_NAMES)
        assert shapes == ((2, 4, t, 4), (2, 4, t, 4), (2, t), (2,))
    initial = unit.initial_state(5, torch.zeros(1))
    assert {slot: tuple(t.shape) for slot, t in initial.items()} == \
        {("key", None): (5, 4, 0, 4), ("value", None): (5, 4, 0, 4), ("key_position", None): (5, 0),
         ("count", None): (5,)}


def test_the_encoder_form_refuses_incremental_state():
    with pytest.raises(ValueError, match="only for the causal"):
        make_unit(causal=False)(torch.randn(1, 1, 16), incremental_state={})


def test_builder_reads_the_spec():
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1,
                     stride=5)
    unit = strided_attention_from_spec(spec)
    assert (unit.embed_dim, unit.num_heads, unit.local_heads, unit.stride, unit.causal) == (16, 4, 2, 5, True)
    assert "strided" in CAUSAL_MIXERS
    with pytest.raises(ValueError, match="divisible"):
        StridedAttention(10, 4, 2, causal=False)
    with pytest.raises(ValueError, match="at least 2 heads"):
        StridedAttention(16, 1, 2, causal=False)
    with pytest.raises(ValueError, match="--stride"):
        StridedAttention(16, 4, 0, causal=False)
