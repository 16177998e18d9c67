"""Fastformer: fast path vs reference, stepping (running sums) vs full causal pass, beams, padding, stability."""
import math

import pytest
import torch

from lite.modules import MixerSpec
from lite.modules.fastformer import STATE_NAMES, Fastformer, fastformer_from_spec
from tests.conftest import assert_close, left_padding
from tests.lite.mixer_checks import assert_padded_frames_do_not_leak


def make_fastformer(causal: bool, embed_dim: int = 16, heads: int = 2) -> Fastformer:
    """A small unit in eval mode whose pooling scores spread over O(1), so that pooling is far from uniform."""
    unit = Fastformer(embed_dim, heads, causal=causal).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.query_score, unit.key_score, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    return unit


@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_matches_reference(causal):
    unit = make_fastformer(causal)
    x = torch.randn(33, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, 33, pads=6)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_formula():
    """C = H = D = 1, all weights 1, biases 0, x = (a, b), causal: q = k = v = x, scores = x;
    frame 0: q_g = a, p_0 = a^2, k_g = a^2, out = a^2 * a + a;
    frame 1: q_g = softmax(a, b) . (a, b), p_1 = q_g b, k_g = softmax(p_0, p_1) . (p_0, p_1), out = k_g b + b."""
    unit = Fastformer(1, 1, causal=True).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.query_score, unit.key_score, unit.out_proj):
            linear.weight.fill_(1.0)
    a, b = 0.7, -1.3
    q_g = (math.exp(a) * a + math.exp(b) * b) / (math.exp(a) + math.exp(b))
    p_0, p_1 = a * a, q_g * b
    k_g = (math.exp(p_0) * p_0 + math.exp(p_1) * p_1) / (math.exp(p_0) + math.exp(p_1))
    expected = torch.tensor([a ** 3 + a, k_g * b + b]).view(2, 1, 1)
    x = torch.tensor([a, b]).view(2, 1, 1)
    assert_close(unit.reference_forward(x), expected)
    assert_close(unit(x), expected)


def test_pooling_matters():
    """Guard against vacuous parity: every frame's output depends on the other frames (non-causal)."""
    unit = make_fastformer(causal=False)
    x = torch.randn(9, 1, 16)
    x_other = x.clone()
    x_other[-1] += 1.0
    assert (unit(x_other) - unit(x))[:-1].abs().amax(dim=(1, 2)).min() > 1e-3


@pytest.mark.parametrize("length", [1, 7, 33, 100])
def test_stepping_matches_full_causal_pass(length):
    unit = make_fastformer(causal=True)
    x = torch.randn(length, 3, 16)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], incremental_state=state) for t in range(length)])
    assert_close(steps, unit(x))


def test_stepping_with_left_padding_matches_full_pass():
    unit = make_fastformer(causal=True)
    x, mask = torch.randn(11, 2, 16), left_padding(2, 11, pads=3)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], mask[:, t:t + 1], state) for t in range(11)])
    assert_close(steps, unit(x, mask))


def test_running_max_keeps_large_scores_finite():
    """Scores of several hundred would overflow exp() in float32 without the running max."""
    unit = make_fastformer(causal=True)
    with torch.no_grad():
        unit.query_score.weight.mul_(200.0)
        unit.key_score.weight.mul_(200.0)
    x = torch.randn(12, 2, 16)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], incremental_state=state) for t in range(12)])
    assert torch.isfinite(steps).all()
    assert_close(steps, unit(x), atol=1e-4, rtol=1e-4)


def test_reorder_incremental_state_follows_beams():
    unit = make_fastformer(causal=True)
    x = torch.randn(10, 3, 16)
    order = torch.tensor([2, 2, 0])
    state = {}
    for t in range(6):
        unit(x[t:t + 1], incremental_state=state)
    unit.reorder_incremental_state(state, order)
    reordered = torch.cat([unit(x[t:t + 1, order], incremental_state=state) for t in range(6, 10)])
    assert_close(reordered, unit(x[:, order])[6:])


@pytest.mark.parametrize("causal", [False, True])
def test_padded_frames_do_not_leak(causal):
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero."""
    unit = make_fastformer(causal)
    assert_padded_frames_do_not_leak(unit)


def test_state_stays_bounded():
    unit = make_fastformer(causal=True)
    state = {}
    shapes = []
    for t in range(40):
        unit(torch.randn(1, 2, 16), incremental_state=state)
        shapes.append({name: tuple(unit.get_incremental_state(state, name).shape) for name in STATE_NAMES})
    assert all(s == shapes[0] for s in shapes)
    assert shapes[0] == {"query_max": (2, 2), "query_den": (2, 2), "query_num": (2, 16),
                         "key_max": (2, 2), "key_den": (2, 2), "key_num": (2, 16)}


def test_batch_of_one():
    unit = make_fastformer(causal=True)
    x = torch.randn(9, 1, 16)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], incremental_state=state) for t in range(9)])
    assert_close(steps, unit(x))
    assert_close(unit(x), unit.reference_forward(x))


def test_builder_reads_the_spec():
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1)
    unit = fastformer_from_spec(spec)
    assert (unit.embed_dim, unit.num_heads, unit.head_dim, unit.causal) == (16, 4, 4, True)
    with pytest.raises(ValueError, match="divisible"):
        Fastformer(10, 4, causal=False)
