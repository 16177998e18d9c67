"""Linear Transformer attention: fast path (S, z sums / prefix sums) vs the attention-form reference, stepping (an
RNN of constant state) vs the full causal pass, beams, padding, the textbook formula."""
import pytest
import torch

from lite.modules import MixerSpec
from lite.modules.linear_attention import STATE_NAMES, LinearAttention, feature_map, linear_attention_from_spec
from tests.conftest import assert_close


def make_unit(causal: bool, embed_dim: int = 16, heads: int = 2) -> LinearAttention:
    """A small unit in eval mode whose kernel values phi(q) . phi(k) spread widely, so the weights are far from
    uniform."""
    unit = LinearAttention(embed_dim, heads, causal=causal).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    return unit


def left_padding(batch: int, length: int, pads: int) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[1, :pads] = True  # the second sentence is left-padded
    return mask


@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_matches_reference(causal):
    unit = make_unit(causal)
    x = torch.randn(33, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, 33, pads=6)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_formula():
    """C = H = D = 1, W_q = W_k = W_v = W_o = 1, biases 0, x = (a, b), causal: phi = elu + 1;
    frame 0: out = a (one value, weight 1); frame 1: out = (phi(b)phi(a) a + phi(b)phi(b) b) / (phi(b)phi(a) + phi(b)^2)."""
    unit = LinearAttention(1, 1, causal=True).eval()
    with torch.no_grad():
        unit.qkv.weight.fill_(1.0)
        unit.out_proj.weight.fill_(1.0)
    a, b = torch.tensor(0.7), torch.tensor(-1.3)
    pa, pb = feature_map(a), feature_map(b)
    second = (pb * pa * a + pb * pb * b) / (pb * pa + pb * pb)
    expected = torch.stack([a, second]).view(2, 1, 1)
    x = torch.stack([a, b]).view(2, 1, 1)
    assert_close(unit.reference_forward(x), expected)
    assert_close(unit(x), expected)


def test_feature_map_is_elu_plus_one():
    x = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    assert_close(feature_map(x), torch.where(x > 0, x + 1, torch.exp(x)))


def test_mixing_matters():
    """Guard against vacuous parity: every frame's output depends on the other frames (non-causal)."""
    unit = make_unit(causal=False)
    x = torch.randn(9, 1, 16)
    x_other = x.clone()
    x_other[-1] += 1.0
    assert (unit(x_other) - unit(x))[:-1].abs().amax(dim=(1, 2)).min() > 1e-4


@pytest.mark.parametrize("length", [1, 7, 33, 100])
def test_stepping_matches_full_causal_pass(length):
    unit = make_unit(causal=True)
    x = torch.randn(length, 3, 16)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], incremental_state=state) for t in range(length)])
    assert_close(steps, unit(x))


def test_stepping_with_left_padding_matches_full_pass():
    unit = make_unit(causal=True)
    x, mask = torch.randn(11, 2, 16), left_padding(2, 11, pads=3)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], mask[:, t:t + 1], state) for t in range(11)])
    assert_close(steps, unit(x, mask))


def test_reorder_incremental_state_follows_beams():
    unit = make_unit(causal=True)
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
    unit = make_unit(causal)
    x = torch.randn(13, 2, 16)
    mask = left_padding(2, 13, pads=3)
    mask[0, -2:] = True  # the first sentence is right-padded
    y = unit(x, mask)
    x_other = x.clone()
    x_other[:3, 1] = 1e3 * torch.randn(3, 16)
    x_other[-2:, 0] = 1e3 * torch.randn(2, 16)
    assert_close(unit(x_other, mask), y)
    assert_close(y[:3, 1], torch.zeros(3, 16))
    assert_close(y[-2:, 0], torch.zeros(2, 16))


def test_state_is_constant_in_the_sentence_length():
    unit = make_unit(causal=True)
    state = {}
    shapes = []
    for _ in range(40):
        unit(torch.randn(1, 2, 16), incremental_state=state)
        shapes.append({name: tuple(unit.get_incremental_state(state, name).shape) for name in STATE_NAMES})
    assert all(s == shapes[0] for s in shapes)
    assert shapes[0] == {"kv": (2, 2, 8, 8), "k_sum": (2, 2, 8)}
    assert {slot: tuple(t.shape) for slot, t in unit.initial_state(5, torch.zeros(1)).items()} == \
        {("kv", None): (5, 2, 8, 8), ("k_sum", None): (5, 2, 8)}


def test_the_encoder_form_refuses_incremental_state():
    with pytest.raises(ValueError, match="only for the causal"):
        make_unit(causal=False)(torch.randn(1, 1, 16), incremental_state={})


def test_builder_reads_the_spec():
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1)
    unit = linear_attention_from_spec(spec)
    assert (unit.embed_dim, unit.num_heads, unit.head_dim, unit.causal) == (16, 4, 4, True)
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(10, 4, causal=False)
