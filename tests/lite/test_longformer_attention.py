"""Longformer attention: fast path (a window of keys plus the gathered global keys; the global queries against all
keys) vs the one-query-one-head-at-a-time reference, stepping (cached keys/values) vs the full causal pass, beams,
padding, global tokens counted from the first real token."""
import pytest
import torch

from lite.modules import CAUSAL_MIXERS, MixerSpec
from lite.modules.longformer_attention import STATE_NAMES, LongformerAttention, longformer_attention_from_spec
from tests.conftest import assert_close, left_padding
from tests.lite.mixer_checks import (assert_padded_frames_do_not_leak, assert_reorder_follows_beams,
                                      assert_stepping_matches_full_pass)

WINDOW, GLOBAL = 3, 2


def make_unit(causal: bool, window: int = WINDOW, global_tokens: int = GLOBAL, embed_dim: int = 16,
              heads: int = 4) -> LongformerAttention:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform."""
    unit = LongformerAttention(embed_dim, heads, window, global_tokens, causal=causal).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    return unit


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 13, 33])  # below, at (2 w + 1 = 7, decoder w + 1 = 4), above
def test_fast_path_matches_reference(causal, length):
    unit = make_unit(causal)
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(5, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window,global_tokens", [(0, 0), (0, 1), (1, 0), (2, 3), (4, 1)])
def test_other_windows_and_global_counts_match_reference(causal, window, global_tokens):
    unit = make_unit(causal, window=window, global_tokens=global_tokens)
    x = torch.randn(11, 2, 16)
    mask = left_padding(2, 11, pads=4)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_pattern():
    """Window 1, 1 global token, C = H = 1, W_q = 0 (uniform weights), W_v = W_o = 1: x = (1, 2, 4, 8, 16). Encoder:
    frame 0 is global (the mean of all), the others average their neighbours and frame 0; causal: j <= i within one
    step back, or frame 0."""
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]).view(5, 1, 1)
    expected = {False: [31 / 5, 7 / 3, 15 / 4, 29 / 4, 25 / 3], True: [1.0, 1.5, 7 / 3, 13 / 3, 25 / 3]}
    for causal in (False, True):
        unit = LongformerAttention(1, 1, 1, 1, causal=causal).eval()
        with torch.no_grad():
            unit.qkv.weight.copy_(torch.tensor([[0.0], [0.0], [1.0]]))
            unit.qkv.bias.zero_()
            unit.out_proj.weight.fill_(1.0)
            unit.out_proj.bias.zero_()
        want = torch.tensor(expected[causal]).view(5, 1, 1)
        assert_close(unit.reference_forward(x), want)
        assert_close(unit(x), want)


@pytest.mark.parametrize("causal", [False, True])
def test_queries_see_their_window_and_the_global_tokens_only(causal):
    """Guard against a vacuous pattern (window 3, 2 global, query 10 of 14): frames 0 and 1 (global) and 7..10
    (encoder: 7..13) reach it; 2..6 do not, so changing them changes nothing. A global query sees every frame."""
    unit = make_unit(causal)
    x = torch.randn(14, 1, 16)
    base = unit(x)
    reach = {0, 1, *range(7, 11 if causal else 14)}
    for frame in range(14):
        changed = x.clone()
        changed[frame] += 1.0
        moved = unit(changed)
        assert ((moved[10] - base[10]).abs().max() > 1e-4) == (frame in reach), frame
        if not causal:
            assert (moved[1] - base[1]).abs().max() > 1e-4, frame  # global query 1 sees all
        elif frame > 1:
            assert (moved[1] - base[1]).abs().max() < 1e-6, frame  # no look-ahead from a global query


@pytest.mark.parametrize("causal", [False, True])
def test_global_tokens_count_from_the_first_real_token(causal):
    """Left padding moves the global tokens with the sentence: a padded sentence gives the outputs it gives alone."""
    unit = make_unit(causal)
    x = torch.randn(12, 2, 16)
    mask = left_padding(2, 12, pads=5)
    padded = unit(x, mask)[5:, 1]
    alone = unit(x[5:, 1:2])[:, 0]
    assert_close(padded, alone)
    # and the global frames are the first real ones: changing frame 5 (position 0, global) reaches the last query,
    # changing frame 0 (a pad) or frame 7 (position 2, outside the last query's window) does not
    last = unit(x, mask)[-1, 1]
    for frame, reaches in ((5, True), (0, False), (7, False)):
        changed = x.clone()
        changed[frame, 1] += 1.0
        assert ((unit(changed, mask)[-1, 1] - last).abs().max() > 1e-4) == reaches, frame


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
    x, mask, y = assert_padded_frames_do_not_leak(unit)
    assert_close(y, unit.reference_forward(x, mask))


def test_sentences_shorter_than_the_global_count():
    """A sentence of one real token (fewer than g) in a batch: its missing global tokens are masked, not read."""
    unit = make_unit(causal=False, global_tokens=3)
    x = torch.randn(6, 2, 16)
    mask = left_padding(2, 6, pads=5)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))
    assert_close(unit(x, mask)[5, 1], unit(x[5:, 1:2])[0, 0])


def test_state_is_the_cached_frames():
    """O(t): the keys/values of every frame so far."""
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
                     longformer_window=5, longformer_global=2)
    unit = longformer_attention_from_spec(spec)
    assert (unit.embed_dim, unit.num_heads, unit.window, unit.global_tokens, unit.causal) == (16, 4, 5, 2, True)
    defaults = MixerSpec(embed_dim=16, attention_heads=4, causal=False, kernel_size=3, conv_type="lightweight",
                         conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.0)
    assert (defaults.longformer_window, defaults.longformer_global) == (4, 1)
    assert "longformer" in CAUSAL_MIXERS
    with pytest.raises(ValueError, match="divisible"):
        LongformerAttention(10, 4, 2, 1, causal=False)
    with pytest.raises(ValueError, match="--longformer-window"):
        LongformerAttention(16, 4, -1, 1, causal=False)
    with pytest.raises(ValueError, match="--longformer-global"):
        LongformerAttention(16, 4, 2, -1, causal=False)
