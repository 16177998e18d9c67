"""Lightweight/dynamic convolution: fast path vs reference, stepping vs full causal pass, padding, beams."""
import pytest
import torch

from lite.modules import DynamicConv, LightweightConv
from lite.modules.lsra import ConvBranch
from tests.conftest import assert_close

CONVS = [LightweightConv, DynamicConv]


@pytest.mark.parametrize("conv_cls", CONVS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel_size", [1, 3, 4, 7])
@pytest.mark.parametrize("training", [False, True])  # DynamicConv: the taps, and the band matrix it trains with
def test_fast_path_matches_reference(conv_cls, causal, kernel_size, training):
    conv = conv_cls(channels=12, kernel_size=kernel_size, num_heads=3, causal=causal).train(training)
    x = torch.randn(9, 2, 12)  # [T, B, C]
    assert_close(conv(x), conv.reference_forward(x))


def test_band_form_continues_a_causal_state():
    """A training pass over several frames after earlier ones (incremental state given) reads their K-1 frames."""
    conv = DynamicConv(channels=8, kernel_size=5, num_heads=2, causal=True)
    x = torch.randn(11, 3, 8)
    state = {}
    both = torch.cat([conv(x[:4], state), conv(x[4:], state)])
    assert_close(both, conv.reference_forward(x))


def test_band_form_gradients_match_the_taps():
    conv = DynamicConv(channels=12, kernel_size=7, num_heads=3, causal=False).double()
    x = torch.randn(9, 2, 12, dtype=torch.double)
    grads = []
    for training in (True, False):
        conv.train(training).zero_grad()
        conv(x).square().sum().backward()
        grads.append(conv.weight_linear.weight.grad.clone())
    assert_close(grads[0], grads[1])


def test_reference_is_the_textbook_formula():
    """Hand-computed: one head, kernel [1, 2, 3] without softmax, causal -> y_t = x_{t-2} + 2 x_{t-1} + 3 x_t."""
    conv = LightweightConv(channels=1, kernel_size=3, num_heads=1, causal=True, weight_softmax=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    x = torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)
    expected = torch.tensor([3.0, 32.0, 321.0]).view(3, 1, 1)
    assert_close(conv.reference_forward(x), expected)
    assert_close(conv(x), expected)


@pytest.mark.parametrize("conv_cls", CONVS)
@pytest.mark.parametrize("length", [1, 7, 33])
def test_stepping_matches_full_causal_pass(conv_cls, length):
    conv = conv_cls(channels=8, kernel_size=5, num_heads=2, causal=True).eval()
    x = torch.randn(length, 3, 8)
    state = {}
    steps = torch.cat([conv(x[t:t + 1], state) for t in range(length)])
    assert_close(steps, conv(x))
    assert conv.get_incremental_state(state, "frames").shape == (4, 3, 8)  # K-1 frames, whatever the length


@pytest.mark.parametrize("conv_cls", CONVS)
def test_reorder_incremental_state_follows_beams(conv_cls):
    conv = conv_cls(channels=8, kernel_size=3, num_heads=2, causal=True).eval()
    x = torch.randn(6, 3, 8)
    order = torch.tensor([2, 2, 0])
    state = {}
    for t in range(4):
        conv(x[t:t + 1], state)
    conv.reorder_incremental_state(state, order)
    reordered = torch.cat([conv(x[t:t + 1, order], state) for t in range(4, 6)])
    assert_close(reordered, conv(x[:, order])[4:])


@pytest.mark.parametrize("conv_cls", CONVS)
def test_padded_frames_do_not_leak(conv_cls):
    """Changing what sits at padded positions changes nothing at real positions."""
    branch = ConvBranch(8, conv_cls(8, kernel_size=5, num_heads=2, causal=False), glu=True).eval()
    x = torch.randn(6, 2, 8)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, :3] = True  # left padding of the second sentence
    y = branch(x, mask)
    x_other = x.clone()
    x_other[:3, 1] = 1e3 * torch.randn(3, 8)
    y_other = branch(x_other, mask)
    assert_close(y_other[3:, 1], y[3:, 1])
    assert_close(y_other[:, 0], y[:, 0])


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match="divisible"):
        LightweightConv(channels=10, kernel_size=3, num_heads=4, causal=False)
