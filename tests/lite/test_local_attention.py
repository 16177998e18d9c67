"""Blockwise local attention: fast path (blocks of L, a window of 2 L keys) vs the one-query-at-a-time reference,
stepping (a ring buffer of 2 L frames) vs the full causal pass across block boundaries, beams, padding."""
import pytest
import torch

from lite.modules import MixerSpec
from lite.modules.local_attention import STATE_NAMES, LocalAttention, front_order, local_attention_from_spec
from tests.conftest import assert_close, left_padding
from tests.lite.mixer_checks import (assert_padded_frames_do_not_leak, assert_reorder_follows_beams,
                                      assert_stepping_matches_full_pass)

BLOCK = 4


def make_unit(causal: bool, block: int = BLOCK, embed_dim: int = 16, heads: int = 2) -> LocalAttention:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform."""
    unit = LocalAttention(embed_dim, heads, block, causal=causal).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    return unit


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 4, 13, 33])
def test_fast_path_matches_reference(causal, length):
    unit = make_unit(causal)
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(6, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_window():
    """Block 2, C = H = D = 1, W_q = 0 (uniform weights), W_v = W_o = 1: encoder frame i averages the frames of its
    block and the previous one; causal frame i those of them up to i."""
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]).view(5, 1, 1)
    expected = {False: [1.5, 1.5, 3.75, 3.75, 28 / 3], True: [1.0, 1.5, 7 / 3, 3.75, 28 / 3]}
    for causal in (False, True):
        unit = LocalAttention(1, 1, 2, causal=causal).eval()
        with torch.no_grad():
            unit.qkv.weight.copy_(torch.tensor([[0.0], [0.0], [1.0]]))
            unit.out_proj.weight.fill_(1.0)
        want = torch.tensor(expected[causal]).view(5, 1, 1)
        assert_close(unit.reference_forward(x), want)
        assert_close(unit(x), want)


def test_queries_do_not_see_beyond_the_previous_block():
    """Guard against a vacuous window: a frame two blocks back changes nothing; one in the previous block does."""
    unit = make_unit(causal=False)
    x = torch.randn(12, 1, 16)  # blocks [0, 4), [4, 8), [8, 12)
    far, near = x.clone(), x.clone()
    far[0] += 1.0
    near[4] += 1.0
    assert_close(unit(far)[8:], unit(x)[8:])
    assert (unit(near)[8:] - unit(x)[8:]).abs().amax(dim=(1, 2)).min() > 1e-4


def test_front_order_is_a_permutation_putting_real_frames_first():
    mask = torch.tensor([[True, True, False, False, False], [False, False, False, True, True]])
    assert front_order(mask).tolist() == [[3, 4, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("length", [1, 3, 4, 5, 8, 9, 17, 33, 70])
def test_stepping_matches_full_causal_pass(length):
    assert_stepping_matches_full_pass(make_unit(causal=True), length)


@pytest.mark.parametrize("length", [2, 9, 23, 70])
def test_stepping_with_left_padding_matches_full_pass(length):
    assert_stepping_matches_full_pass(make_unit(causal=True), length, pads=min(5, length - 1))


def test_reorder_incremental_state_follows_beams():
    assert_reorder_follows_beams(make_unit(causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_padded_frames_do_not_leak(causal):
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero."""
    unit = make_unit(causal)
    assert_padded_frames_do_not_leak(unit)


def test_state_holds_two_blocks_whatever_the_length():
    unit = make_unit(causal=True)
    state, shapes = {}, set()
    for _ in range(40):
        unit(torch.randn(1, 2, 16), incremental_state=state)
        shapes.add(tuple(tuple(unit.get_incremental_state(state, name).shape) for name in STATE_NAMES))
    assert shapes == {((2, 2, 2 * BLOCK, 8), (2, 2, 2 * BLOCK, 8), (2, 2 * BLOCK), (2,))}
    assert sorted(unit.get_incremental_state(state, "slot_position")[0].tolist()) == list(range(40 - 2 * BLOCK, 40))
    initial = unit.initial_state(5, torch.zeros(1))
    assert {slot: tuple(t.shape) for slot, t in initial.items()} == \
        {("key", None): (5, 2, 8, 8), ("value", None): (5, 2, 8, 8), ("slot_position", None): (5, 8),
         ("count", None): (5,)}
    assert (initial[("slot_position", None)] == -1).all()


def test_the_encoder_form_refuses_incremental_state():
    with pytest.raises(ValueError, match="only for the causal"):
        make_unit(causal=False)(torch.randn(1, 1, 16), incremental_state={})


def test_builder_reads_the_spec():
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1,
                     local_block=5)
    unit = local_attention_from_spec(spec)
    assert (unit.embed_dim, unit.num_heads, unit.head_dim, unit.block, unit.causal) == (16, 4, 4, 5, True)
    with pytest.raises(ValueError, match="divisible"):
        LocalAttention(10, 4, 2, causal=False)
    with pytest.raises(ValueError, match="--local-block"):
        LocalAttention(16, 4, 0, causal=False)
