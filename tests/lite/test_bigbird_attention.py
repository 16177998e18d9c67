"""BigBird attention: fast path (dense attention under the window + global + random visibility mask) vs the
one-query-one-head-at-a-time reference, padding, global tokens counted from the first real token, the random pattern
fixed at build time and kept in the state dict, the length limit, and no decoder use (no causal form here)."""
import pytest
import torch

from lite.modules import CAUSAL_MIXERS, MixerSpec
from lite.modules.bigbird_attention import BigBirdAttention, bigbird_attention_from_spec, random_keys
from tests.conftest import assert_close, left_padding, tiny_model
from tests.lite.mixer_checks import assert_padded_frames_do_not_leak

WINDOW, GLOBAL, RANDOM, MAX_LEN = 2, 1, 2, 40


def make_unit(window: int = WINDOW, global_tokens: int = GLOBAL, random: int = RANDOM, max_len: int = MAX_LEN,
              embed_dim: int = 16, heads: int = 4) -> BigBirdAttention:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform."""
    unit = BigBirdAttention(embed_dim, heads, window, global_tokens, random, max_len).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    return unit


def spec(**fields) -> MixerSpec:
    return MixerSpec(**{"embed_dim": 16, "attention_heads": 4, "causal": False, "kernel_size": 3,
                        "conv_type": "lightweight", "conv_heads": 2, "conv_glu": True, "weight_softmax": True,
                        "weight_dropout": 0.0, "attention_dropout": 0.0, **fields})


@pytest.mark.parametrize("length", [1, 2, 3, 5, 6, 13, 33, MAX_LEN])  # below, at (2 w + 1 = 5), above, max_len
def test_fast_path_matches_reference(length):
    unit = make_unit()
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(5, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


@pytest.mark.parametrize("window,global_tokens,random", [(0, 0, 0), (0, 0, 3), (1, 0, 1), (2, 3, 0), (4, 1, 5)])
def test_other_patterns_match_reference(window, global_tokens, random):
    unit = make_unit(window=window, global_tokens=global_tokens, random=random, max_len=16)
    x = torch.randn(16, 2, 16)
    mask = left_padding(2, 16, pads=4)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_pattern():
    """Window 1, 1 global token, 1 random key, C = H = 1, W_q = 0 (uniform weights), W_v = W_o = 1, x = (1, 2, 4, 8,
    16), R = (0, 4, 0, 0, 1) set by hand: frame 0 is global (the mean of all); frame 1 sees 0, 1, 2 and its random key
    4; frame 4 sees 0, 3, 4 and its random key 1; the others their neighbours and frame 0."""
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]).view(5, 1, 1)
    unit = BigBirdAttention(1, 1, 1, 1, 1, 5).eval()
    with torch.no_grad():
        unit.qkv.weight.copy_(torch.tensor([[0.0], [0.0], [1.0]]))
        unit.qkv.bias.zero_()
        unit.out_proj.weight.fill_(1.0)
        unit.out_proj.bias.zero_()
        unit.random_keys.copy_(torch.tensor([[0], [4], [0], [0], [1]]))
    want = torch.tensor([31 / 5, 23 / 4, 15 / 4, 29 / 4, 27 / 4]).view(5, 1, 1)
    assert_close(unit.reference_forward(x), want)
    assert_close(unit(x), want)


def test_queries_see_their_window_the_global_tokens_and_their_random_keys_only():
    """Guard against a vacuous pattern (window 2, 1 global, query 10 of 20): frame 0 (global), 8..12 and R[10] reach
    it, no other frame does; the global query 0 sees every frame."""
    unit = make_unit(max_len=20)
    with torch.no_grad():
        unit.random_keys[10] = torch.tensor([3, 17])
    x = torch.randn(20, 1, 16)
    base = unit(x)
    reach = {0, 3, 17, *range(8, 13)}
    for frame in range(20):
        changed = x.clone()
        changed[frame] += 1.0
        moved = unit(changed)
        assert ((moved[10] - base[10]).abs().max() > 1e-4) == (frame in reach), frame
        assert (moved[0] - base[0]).abs().max() > 1e-4, frame


def test_global_tokens_count_from_the_first_real_token():
    """Left padding moves the global tokens and the random pattern with the sentence: a padded sentence gives the
    outputs it gives alone; changing frame 5 (position 0, global) reaches the last query, frame 0 (a pad) does not."""
    unit = make_unit(random=0)
    x = torch.randn(12, 2, 16)
    mask = left_padding(2, 12, pads=5)
    assert_close(unit(x, mask)[5:, 1], unit(x[5:, 1:2])[:, 0])
    last = unit(x, mask)[-1, 1]
    for frame, reaches in ((5, True), (0, False), (7, False)):
        changed = x.clone()
        changed[frame, 1] += 1.0
        assert ((unit(changed, mask)[-1, 1] - last).abs().max() > 1e-4) == reaches, frame


def test_left_padding_changes_nothing():
    """Random keys, too, are looked up by positions counted from the first real token."""
    unit = make_unit()
    x = torch.randn(17, 1, 16)
    padded = torch.cat([torch.randn(6, 1, 16), x])
    mask = torch.zeros(1, 23, dtype=torch.bool)
    mask[0, :6] = True
    assert_close(unit(padded, mask)[6:], unit(x))


def test_padded_frames_do_not_leak():
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero;
    random keys beyond the sentence wrap into it (R mod L), never onto a pad."""
    unit = make_unit(random=6)  # 6 random keys over 40 positions: some fall beyond these 13 frames
    x, mask, y = assert_padded_frames_do_not_leak(unit)
    assert_close(y, unit.reference_forward(x, mask))
    assert (unit.random_keys[:13] >= 11).any()  # the case is not vacuous


def test_random_keys_wrap_into_the_sentence():
    """R[i] = 17 in a 10-frame sentence is key 7 (17 mod 10): it reaches query 1, which sees 0..3 otherwise."""
    unit = make_unit(window=2, global_tokens=1, random=1, max_len=20)
    with torch.no_grad():
        unit.random_keys[1] = torch.tensor([17])
    x = torch.randn(10, 1, 16)
    changed = x.clone()
    changed[7] += 1.0
    assert (unit(changed)[1] - unit(x)[1]).abs().max() > 1e-4
    assert_close(unit(x), unit.reference_forward(x))


def test_the_random_pattern_is_fixed_and_saved():
    """Built twice, the same pattern (fixed seed); it is a buffer in the state dict, so a checkpoint restores it."""
    first, second = make_unit(), make_unit()
    assert torch.equal(first.random_keys, second.random_keys)
    assert torch.equal(first.random_keys, random_keys(MAX_LEN, RANDOM))
    assert first.random_keys.shape == (MAX_LEN, RANDOM)
    assert 0 <= first.random_keys.min() and first.random_keys.max() < MAX_LEN
    state = first.state_dict()
    assert torch.equal(state["random_keys"], first.random_keys)
    x = torch.randn(21, 2, 16)
    second.load_state_dict(state)
    assert torch.equal(first(x), second(x))
    other = make_unit()
    other.random_keys.copy_(torch.flip(first.random_keys, [0]))  # a checkpoint's pattern replaces the drawn one
    other.load_state_dict(state)
    assert torch.equal(other.random_keys, first.random_keys)
    model = tiny_model("bigbird_100m")
    assert all(key.endswith("random_keys") for key in model.state_dict() if "random" in key)
    assert sum(key.endswith("mixer.random_keys") for key in model.state_dict()) == 2  # the 2 encoder layers


def test_inputs_longer_than_max_len_are_refused():
    unit = make_unit(max_len=8)
    unit(torch.randn(8, 1, 16))
    with pytest.raises(ValueError, match="9 frames is longer than --bigbird-max-len 8"):
        unit(torch.randn(9, 1, 16))


def test_the_encoder_reads_at_most_max_len_positions():
    model = tiny_model("bigbird_100m", bigbird_max_len=8)
    assert model.encoder.max_positions() == 8
    assert model.encoder.layers[0].mixer.max_len == 8


def test_no_incremental_state_and_no_causal_build():
    with pytest.raises(ValueError, match="no causal form"):
        make_unit()(torch.randn(1, 1, 16), incremental_state={})
    with pytest.raises(ValueError, match="no causal form"):
        bigbird_attention_from_spec(spec(causal=True))
    assert "bigbird" not in CAUSAL_MIXERS


def test_builder_reads_the_spec():
    unit = bigbird_attention_from_spec(spec(attention_dropout=0.1, bigbird_window=5, bigbird_global=2,
                                            bigbird_random=3, bigbird_max_len=12))
    assert (unit.num_heads, unit.window, unit.global_tokens, unit.random, unit.max_len, unit.dropout) == \
        (4, 5, 2, 3, 12, 0.1)
    assert unit.random_keys.shape == (12, 3)
    defaults = spec()
    assert (defaults.bigbird_window, defaults.bigbird_global, defaults.bigbird_random, defaults.bigbird_max_len) == \
        (3, 1, 2, 256)
    with pytest.raises(ValueError, match="divisible"):
        BigBirdAttention(10, 4, 2, 1, 2, 8)
    for flag, values in (("--bigbird-window", (-1, 1, 2, 8)), ("--bigbird-global", (2, -1, 2, 8)),
                         ("--bigbird-random", (2, 1, -1, 8)), ("--bigbird-max-len", (2, 1, 2, 0))):
        with pytest.raises(ValueError, match=flag):
            BigBirdAttention(16, 4, *values)


def test_the_preset_pairs_it_with_the_attention_decoder():
    args = tiny_model("bigbird_100m").args
    assert (args.encoder_mixer, args.decoder_mixer, args.bigbird_window, args.bigbird_global, args.bigbird_random,
            args.bigbird_max_len) == ("bigbird", "attention", 3, 1, 2, 256)
