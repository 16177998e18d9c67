"""Synthesizer attention, dense and random: fast path (logits of the present positions only) vs the paper's formulas
one query at a time, stepping (cached values) vs the full causal pass, beams, padding, the maximum length."""
import pytest
import torch

from lite.modules import MixerSpec
from lite.modules.synthesizer import (STATE_NAMES, Synthesizer, dense_synthesizer_from_spec,
                                      random_synthesizer_from_spec, real_positions)
from tests.conftest import assert_close, left_padding, tiny_model
from tests.lite.mixer_checks import assert_padded_frames_do_not_leak

MAX_LEN = 80
KINDS = ["dense", "random"]


def make_unit(kind: str, causal: bool, max_len: int = MAX_LEN) -> Synthesizer:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform."""
    unit = Synthesizer(16, 2, max_len, kind=kind, causal=causal).eval()
    with torch.no_grad():
        for p in unit.parameters():
            p.normal_(0.0, 0.5)
    return unit


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 13, 33])
def test_fast_path_matches_reference(kind, causal, length):
    unit = make_unit(kind, causal)
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(6, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_random_reference_is_the_textbook_formula():
    """H = C = D = 1, W_v = W_o = 1, R = [[0, ln 3], [ln 3, 0]], x = (a, b): encoder frame 0 weighs (a, b) by
    (1, 3) / 4, frame 1 by (3, 1) / 4; causal frame 0 is a alone, frame 1 weighs (a, b) by (3, 1) / 4."""
    a, b = 2.0, -6.0
    x = torch.tensor([a, b]).view(2, 1, 1)
    expected = {False: [(a + 3 * b) / 4, (3 * a + b) / 4], True: [a, (3 * a + b) / 4]}
    for causal in (False, True):
        unit = Synthesizer(1, 1, 2, kind="random", causal=causal).eval()
        with torch.no_grad():
            unit.value.weight.fill_(1.0)
            unit.out_proj.weight.fill_(1.0)
            unit.logits.copy_(torch.log(torch.tensor([[[1.0, 3.0], [3.0, 1.0]]])))
        want = torch.tensor(expected[causal]).view(2, 1, 1)
        assert_close(unit.reference_forward(x), want)
        assert_close(unit(x), want)


def test_dense_logits_are_the_mlp_of_the_query_alone():
    """Dense: the weights of query i depend on x_i (through the MLP) and not on the keys' content; random: on
    neither. Changing a key frame's content changes the outputs only through its value."""
    x = torch.randn(6, 1, 16)
    for kind in KINDS:
        unit = make_unit(kind, causal=False)
        with torch.no_grad():
            unit.value.weight.zero_()
            unit.value.bias.fill_(1.0)  # every value is the same: weights that sum to 1 give the same output
        y = unit(x)
        assert_close(y, y[:1].expand_as(y))
    dense = make_unit("dense", causal=False)
    other = x.clone()
    other[0] += 1.0
    assert (dense(other)[0] - dense(x)[0]).abs().max() > 1e-4  # query 0's weights moved with x_0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [1, 7, 33, 70])
def test_stepping_matches_full_causal_pass(kind, length):
    unit = make_unit(kind, causal=True)
    x = torch.randn(length, 3, 16)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], incremental_state=state) for t in range(length)])
    assert_close(steps, unit(x))


@pytest.mark.parametrize("kind", KINDS)
def test_stepping_with_left_padding_matches_full_pass(kind):
    unit = make_unit(kind, causal=True)
    x, mask = torch.randn(21, 2, 16), left_padding(2, 21, pads=5)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], mask[:, t:t + 1], state) for t in range(21)])
    assert_close(steps, unit(x, mask))


@pytest.mark.parametrize("kind", KINDS)
def test_reorder_incremental_state_follows_beams(kind):
    unit = make_unit(kind, causal=True)
    x = torch.randn(10, 3, 16)
    order = torch.tensor([2, 2, 0])
    state = {}
    for t in range(6):
        unit(x[t:t + 1], incremental_state=state)
    unit.reorder_incremental_state(state, order)
    reordered = torch.cat([unit(x[t:t + 1, order], incremental_state=state) for t in range(6, 10)])
    assert_close(reordered, unit(x[:, order])[6:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_padded_frames_do_not_leak(kind, causal):
    unit = make_unit(kind, causal)
    assert_padded_frames_do_not_leak(unit)


def test_real_positions_count_from_the_first_real_token():
    mask = torch.tensor([[True, True, False, False, False], [False, False, False, True, True]])
    assert real_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


@pytest.mark.parametrize("kind", KINDS)
def test_longer_inputs_are_refused_naming_the_flag(kind):
    unit = make_unit(kind, causal=True, max_len=8)
    unit(torch.randn(8, 1, 16))  # the maximum itself is fine
    with pytest.raises(ValueError, match="9 frames is longer than --synthesizer-max-len 8"):
        unit(torch.randn(9, 1, 16))
    state = {}
    for _ in range(8):
        unit(torch.randn(1, 1, 16), incremental_state=state)
    with pytest.raises(ValueError, match="--synthesizer-max-len 8"):
        unit(torch.randn(1, 1, 16), incremental_state=state)


def test_state_caches_one_value_a_frame():
    unit = make_unit("dense", causal=True)
    state = {}
    for t in range(1, 6):
        unit(torch.randn(1, 2, 16), incremental_state=state)
        shapes = {name: tuple(unit.get_incremental_state(state, name).shape) for name in STATE_NAMES}
        assert shapes == {"value": (2, 2, t, 8), "position": (2, t), "count": (2,)}
    assert {slot: tuple(t.shape) for slot, t in unit.initial_state(5, torch.zeros(1)).items()} == \
        {("value", None): (5, 2, 0, 8), ("position", None): (5, 0), ("count", None): (5,)}


def test_the_encoder_form_refuses_incremental_state():
    with pytest.raises(ValueError, match="only for the causal"):
        make_unit("random", causal=False)(torch.randn(1, 1, 16), incremental_state={})


def test_builders_read_the_spec():
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1,
                     synthesizer_max_len=12)
    dense, random = dense_synthesizer_from_spec(spec), random_synthesizer_from_spec(spec)
    assert (dense.kind, dense.num_heads, dense.max_len, dense.causal) == ("dense", 4, 12, True)
    assert dense.logit_weight.shape == (4, 4, 12) and random.logits.shape == (4, 12, 12)
    with pytest.raises(ValueError, match="divisible"):
        Synthesizer(10, 4, 8, kind="dense", causal=False)
    with pytest.raises(ValueError, match="--synthesizer-max-len"):
        Synthesizer(16, 4, 0, kind="dense", causal=False)


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_reads_at_most_max_len_positions(kind):
    """Encoder and decoder report the mixer's length as their max positions (translators truncate sources there, the
    search stops there); a teacher-forced pass of exactly that length runs."""
    model = tiny_model(f"synthesizer_{kind}_100m", synthesizer_max_len=8)
    assert model.max_positions() == (8, 8)
    tokens = torch.randint(4, 40, (2, 8))
    assert model(tokens, torch.full((2,), 8), tokens)[0].shape == (2, 8, len(model.decoder.dictionary))
