"""GAU / FLASH: fast path vs reference, stepping vs full causal pass, beams, padding, bounded state."""
import math

import pytest
import torch

from lite.modules import MixerSpec
from lite.modules.gau import GAU, STATE_NAMES, gau_from_spec
from tests.conftest import assert_close, left_padding

CHUNKS = [0, 16, 32, 5]  # 0 = FLASH-Quad; 5 does not divide the test length 33


def make_gau(chunk_size: int, causal: bool, embed_dim: int = 16) -> GAU:
    """A small unit in eval mode with U, V, Z and the attention weights at O(1), so that outputs are O(1) and
    a tolerance of 1e-5 means something (the paper's gamma init, N(0, 0.02), would leave attention near zero)."""
    gau = GAU(embed_dim, expansion=2, key_dim=8, causal=causal, chunk_size=chunk_size, max_positions=64).eval()
    with torch.no_grad():
        gau.proj.weight.normal_(0.0, 0.25)
        gau.out_proj.weight.normal_(0.0, 0.25)
        gau.gamma.normal_(0.0, 1.0)
        gau.beta.normal_(0.0, 0.5)
    return gau


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_fast_path_matches_reference(chunk_size, causal, training):
    """In both modes: training leaves out FLASH's unread linear part (no dropout here, so the modes agree)."""
    gau = make_gau(chunk_size, causal).train(training)
    x = torch.randn(33, 2, 16)  # [T, B, C]
    assert_close(gau(x), gau.reference_forward(x))
    mask = left_padding(2, 33, pads=6)
    assert_close(gau(x, mask), gau.reference_forward(x, mask))


@pytest.mark.parametrize("length", [5, 16, 33])
def test_training_form_has_the_gradients_of_the_papers_form(length):
    """FLASH's causal training pass (chunk 0's and the last chunk's linear part left out) against the paper's form
    (eval mode), float64: one chunk, whole chunks, a padded last chunk."""
    gau = make_gau(16, causal=True).double()
    x = torch.randn(length, 2, 16, dtype=torch.float64, requires_grad=True)
    grads = []
    for training in (False, True):
        gau.train(training)
        y = gau(x)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                         [x, *gau.parameters()]))
    for paper, trained in zip(*grads):
        assert_close(trained, paper)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_attention_matters(chunk_size):
    """Guard against vacuous parity: the output depends on other frames, and the linear part on other chunks."""
    gau = make_gau(chunk_size, causal=False)
    x = torch.randn(33, 1, 16)
    x_other = x.clone()
    x_other[-1] += 1.0  # last frame, in the last chunk
    change = (gau(x_other) - gau(x))[:-1].abs().amax(dim=(1, 2))  # [T - 1]: at every other frame
    assert change.max() > 1e-2
    if chunk_size:  # the first frame sees the last chunk through the linear part only
        assert change[0] > 1e-3


def test_reference_is_the_textbook_formula():
    """Hand-computed, C = E = 1, S = 2, all weights 1, gamma 1, beta 0, causal FLASH-Quad, x = (a, b):
    u = v = silu(x), q = k = rope((silu(x), silu(x))), rotation by t radians at t (theta_0 = 1), so with
    s_a = silu(a), s_b = silu(b):  y_0 = s_a * relu(2 s_a^2 / sqrt 2)^2 * s_a / 1 = 2 s_a^6,
    y_1 = s_b * (relu(2 s_a s_b cos 1 / sqrt 2)^2 s_a + relu(2 s_b^2 / sqrt 2)^2 s_b) / 2."""
    gau = GAU(1, expansion=1, key_dim=2, causal=True).eval()
    with torch.no_grad():
        gau.proj.weight.fill_(1.0)
        gau.out_proj.weight.fill_(1.0)
        gau.gamma.fill_(1.0)
    a, b = 0.7, 1.3
    s_a, s_b = a / (1 + math.exp(-a)), b / (1 + math.exp(-b))
    y_0 = 2 * s_a ** 6
    y_1 = s_b * (2 * s_a ** 2 * s_b ** 2 * math.cos(1.0) ** 2 * s_a + 2 * s_b ** 4 * s_b) / 2
    x = torch.tensor([a, b]).view(2, 1, 1)
    expected = torch.tensor([y_0, y_1]).view(2, 1, 1)
    assert_close(gau.reference_forward(x), expected)
    assert_close(gau(x), expected)


@pytest.mark.parametrize("chunk_size,length", [(0, 1), (0, 7), (0, 33), (4, 1), (4, 7), (4, 19), (4, 33),
                                               (16, 33), (5, 33)])
def test_stepping_matches_full_causal_pass(chunk_size, length):
    gau = make_gau(chunk_size, causal=True)
    x = torch.randn(length, 3, 16)
    state = {}
    steps = torch.cat([gau(x[t:t + 1], incremental_state=state) for t in range(length)])
    assert_close(steps, gau(x))


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_stepping_with_left_padding_matches_full_pass(chunk_size):
    gau = make_gau(chunk_size, causal=True)
    x, mask = torch.randn(11, 2, 16), left_padding(2, 11, pads=3)
    state = {}
    steps = torch.cat([gau(x[t:t + 1], mask[:, t:t + 1], state) for t in range(11)])
    assert_close(steps, gau(x, mask))


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_reorder_incremental_state_follows_beams(chunk_size):
    gau = make_gau(chunk_size, causal=True)
    x = torch.randn(10, 3, 16)
    order = torch.tensor([2, 2, 0])
    state = {}
    for t in range(6):  # ends inside the second chunk when chunk_size = 4
        gau(x[t:t + 1], incremental_state=state)
    gau.reorder_incremental_state(state, order)
    reordered = torch.cat([gau(x[t:t + 1, order], incremental_state=state) for t in range(6, 10)])
    assert_close(reordered, gau(x[:, order])[6:])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [0, 4, 5])
def test_padded_frames_do_not_leak(chunk_size, causal):
    """Changing what sits at padded positions changes nothing at real positions; pad outputs are zero."""
    gau = make_gau(chunk_size, causal)
    x, mask = torch.randn(13, 2, 16), left_padding(2, 13, pads=3)
    y = gau(x, mask)
    x_other = x.clone()
    x_other[:3, 1] = 1e3 * torch.randn(3, 16)
    y_other = gau(x_other, mask)
    assert_close(y_other[3:, 1], y[3:, 1])
    assert_close(y_other[:, 0], y[:, 0])
    assert_close(y[:3, 1], torch.zeros(3, 16))


def state_shapes(gau: GAU, state) -> dict:
    return {name: tuple(t.shape) for name in STATE_NAMES
            if (t := gau.get_incremental_state(state, name)) is not None}


def test_flash_state_stays_bounded():
    gau = make_gau(4, causal=True)
    x = torch.randn(40, 2, 16)
    state = {}
    gau(x[:1], incremental_state=state)
    first = state_shapes(gau, state)
    assert first == {"position": (2,), "count": (2,), "key": (2, 4, 8), "value": (2, 4, 32),
                     "kv": (2, 8, 32), "kv_chunk": (2, 8, 32)}
    for t in range(1, 40):
        gau(x[t:t + 1], incremental_state=state)
        assert state_shapes(gau, state) == first


def test_quad_cache_holds_every_frame():
    gau = make_gau(0, causal=True)
    state = {}
    for t in range(5):
        gau(torch.randn(1, 2, 16), incremental_state=state)
    assert state_shapes(gau, state) == {"position": (2,), "count": (2,), "key": (2, 5, 8), "value": (2, 5, 32)}


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_batch_of_one(chunk_size):
    gau = make_gau(chunk_size, causal=True)
    x = torch.randn(9, 1, 16)
    state = {}
    steps = torch.cat([gau(x[t:t + 1], incremental_state=state) for t in range(9)])
    assert_close(steps, gau(x))
    assert_close(gau(x), gau.reference_forward(x))


def test_builder_reads_the_spec():
    spec = MixerSpec(embed_dim=16, attention_heads=2, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1,
                     gau_expansion=3, gau_key_dim=8, chunk_size=4)
    gau = gau_from_spec(spec)
    assert (gau.embed_dim, gau.hidden_dim, gau.key_dim, gau.causal, gau.chunk_size, gau.dropout) == \
        (16, 48, 8, True, 4, 0.1)
    assert gau.gamma.shape == (4, 8)  # quad q, quad k, linear q, linear k
    assert gau(torch.randn(5, 2, 16)).shape == (5, 2, 16)


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="key_dim"):
        GAU(16, key_dim=7, causal=False)
    with pytest.raises(ValueError, match="chunk_size"):
        GAU(16, causal=False, chunk_size=-1)
    with pytest.raises(ValueError, match="max_positions"):
        GAU(16, key_dim=8, causal=False, max_positions=4)(torch.randn(5, 1, 16))


class _WithMask(torch.nn.Module):
    def __init__(self, gau: GAU):
        super().__init__()
        self.gau = gau

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.gau(x, padding_mask)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, as for the other mixers
@pytest.mark.parametrize("chunk_size,causal", [(0, False), (5, True)])
def test_onnx_runtime_matches_torch(chunk_size, causal, tmp_path):
    """One export with dynamic T and B, run over batch {1, 3} x length {1, 7, 33} (with a left-padded sentence)."""
    ort = pytest.importorskip("onnxruntime")
    gau = make_gau(chunk_size, causal)
    path = tmp_path / "gau.onnx"
    torch.onnx.export(_WithMask(gau), (torch.randn(7, 3, 16), torch.zeros(3, 7, dtype=torch.bool)), str(path),
                      input_names=["x", "padding_mask"], output_names=["y"], opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "T", 1: "B"}, "padding_mask": {0: "B", 1: "T"}, "y": {0: "T", 1: "B"}})
    session = ort.InferenceSession(str(path))
    for batch in (1, 3):
        for length in (1, 7, 33):
            x, mask = torch.randn(length, batch, 16), torch.zeros(batch, length, dtype=torch.bool)
            if batch > 1 and length > 3:
                mask[1, :3] = True
            (y,) = session.run(None, {"x": x.numpy(), "padding_mask": mask.numpy()})
            assert_close(torch.from_numpy(y), gau(x, mask).detach())
