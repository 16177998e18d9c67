"""Poolingformer attention: fast path (window gather, then pooled keys/values gathered per query) vs the
one-query-one-head-at-a-time reference, a hand-computed case, each query's reach, padding (pools counted from the
first real token, pads excluded from the pools), the options, and no decoder use (no causal form here)."""
import pytest
import torch

from lite.modules import CAUSAL_MIXERS, MIXERS, MixerSpec
from lite.modules.poolingformer import PoolingformerAttention, poolingformer_from_spec, pools_a_query
from tests.conftest import assert_close, left_padding, tiny_model
from tests.lite.mixer_checks import assert_padded_frames_do_not_leak

WINDOW, POOL_WINDOW, POOL = 2, 5, 3  # pools of 3 within 5: the window touches 2 to 5 pools, some partial


def make_unit(window: int = WINDOW, pool_window: int = POOL_WINDOW, pool: int = POOL, embed_dim: int = 16,
              heads: int = 4) -> PoolingformerAttention:
    """A small unit in eval mode with spread-out logits and pooling kernels far from the mean (the output projection
    kept small: outputs of ~1, so that float32 rounding stays well within the tolerance)."""
    unit = PoolingformerAttention(embed_dim, heads, window, pool_window, pool).eval()
    with torch.no_grad():
        for linear, std in ((unit.qkv, 0.5), (unit.pool_qkv, 0.5), (unit.out_proj, 0.1)):
            linear.weight.normal_(0.0, std)
            linear.bias.normal_(0.0, 0.1)
        unit.pool_weight.normal_(0.0, 1.0)
    return unit


def spec(**fields) -> MixerSpec:
    return MixerSpec(**{"embed_dim": 16, "attention_heads": 4, "causal": False, "kernel_size": 3,
                        "conv_type": "lightweight", "conv_heads": 2, "conv_glu": True, "weight_softmax": True,
                        "weight_dropout": 0.0, "attention_dropout": 0.0, **fields})


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 6, 7, 13, 33])  # one pool, a partial pool, past both windows
def test_fast_path_matches_reference(length):
    unit = make_unit()
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(5, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


@pytest.mark.parametrize("window,pool_window,pool", [(0, 0, 1), (0, 4, 1), (1, 4, 2), (3, 2, 4), (1, 7, 3),
                                                     (2, 16, 4), (4, 3, 20)])
def test_other_patterns_match_reference(window, pool_window, pool):
    unit = make_unit(window=window, pool_window=pool_window, pool=pool)
    x = torch.randn(19, 2, 16)
    mask = left_padding(2, 19, pads=6)
    mask[0, -3:] = True  # the first sentence is right-padded
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_schema():
    """w1 = w2 = 1, pools of 2, C = H = 1, W_q = W_k = W_q' = W_k' = 0 (uniform weights), W_v = W_v' = W_o = 1, value
    kernel (1/4, 3/4), x = (1, 2, 4, 8, 16). Level 1: Y = (3/2, 7/3, 14/3, 28/3, 12), each frame's neighbours'
    mean. Pools of Y's values: 3/8 + 7/4 = 17/8, 14/12 + 21/3 = 49/6, and the last, a single real tap, 12. Query 0
    touches pool 0; 1 and 2 pools 0, 1; 3 and 4 pools 1, 2. Out = Y + Z."""
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]).view(5, 1, 1)
    unit = PoolingformerAttention(1, 1, 1, 1, 2).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.pool_qkv):
            linear.weight.copy_(torch.tensor([[0.0], [0.0], [1.0]]))
            linear.bias.zero_()
        unit.out_proj.weight.fill_(1.0)
        unit.out_proj.bias.zero_()
        unit.pool_weight[1, 0] = torch.log(torch.tensor([1.0, 3.0]))
    want = torch.tensor([29 / 8, 359 / 48, 471 / 48, 233 / 12, 265 / 12]).view(5, 1, 1)
    assert_close(unit.reference_forward(x), want)
    assert_close(unit(x), want)


def test_a_query_reaches_its_window_and_the_pools_of_its_wider_window_only():
    """Guard against a vacuous schema (w1 = 1, w2 = 4, pools of 2, query 10 of 20): level 2 touches the pools of
    positions 6..14, pools 3..7 (frames 6..15), whose first-level outputs read frames 5..16; no other frame reaches
    it."""
    unit = PoolingformerAttention(16, 4, 1, 4, 2).eval()  # as built: weights not so sharp that a pool is lost
    x = torch.randn(20, 1, 16)
    base = unit(x)
    for frame in range(20):
        changed = x.clone()
        changed[frame] += 1.0
        assert ((unit(changed)[10] - base[10]).abs().max() > 1e-4) == (5 <= frame <= 16), frame


def test_pools_count_from_the_first_real_token():
    """Left padding moves the pools with the sentence: a padded sentence gives the outputs it gives alone, whatever
    sits at the pads (moved pool boundaries would change them: pools of 3 after 5 pads)."""
    unit = make_unit()
    x = torch.randn(17, 1, 16)
    padded = torch.cat([1e3 * torch.randn(5, 1, 16), x])
    mask = torch.zeros(1, 22, dtype=torch.bool)
    mask[0, :5] = True
    assert_close(unit(padded, mask)[5:], unit(x))


def test_padded_frames_do_not_leak():
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero; a
    partial pool's softmax runs over its real taps only."""
    unit = make_unit()
    x, mask, y = assert_padded_frames_do_not_leak(unit)  # the first: 11 real frames, a last pool of 2
    assert_close(y[:11, 0], unit(x[:11, :1])[:, 0])
    assert_close(y, unit.reference_forward(x, mask))


def test_a_new_unit_pools_by_the_mean():
    """The kernels start at zero: softmax weights 1 / k, mean pooling; they are parameters (trained, saved)."""
    unit = PoolingformerAttention(16, 4, 2, 5, 3)
    assert torch.equal(unit.pool_weight, torch.zeros(2, 4, 3))
    assert unit.pool_weight.requires_grad and "pool_weight" in unit.state_dict()
    assert [pools_a_query(w2, k) for w2, k in ((16, 4), (5, 3), (0, 1), (4, 1), (2, 4))] == [9, 5, 1, 9, 2]


def test_no_incremental_state_and_no_causal_build():
    with pytest.raises(ValueError, match="no causal form"):
        make_unit()(torch.randn(1, 1, 16), incremental_state={})
    with pytest.raises(ValueError, match="no causal form"):
        poolingformer_from_spec(spec(causal=True))
    assert "poolingformer" in MIXERS and "poolingformer" not in CAUSAL_MIXERS


def test_builder_reads_the_spec():
    unit = poolingformer_from_spec(spec(attention_dropout=0.1, poolingformer_window=3, poolingformer_pool_window=9,
                                        poolingformer_pool=2))
    assert (unit.num_heads, unit.window, unit.pool_window, unit.pool, unit.dropout) == (4, 3, 9, 2, 0.1)
    assert unit.pool_weight.shape == (2, 4, 2)
    defaults = spec()
    assert (defaults.poolingformer_window, defaults.poolingformer_pool_window, defaults.poolingformer_pool) == \
        (4, 16, 4)


@pytest.mark.parametrize("flag,values,field", [("--poolingformer-window", (-1, 16, 4), "poolingformer_window"),
                                               ("--poolingformer-pool-window", (4, -1, 4), "poolingformer_pool_window"),
                                               ("--poolingformer-pool", (4, 16, 0), "poolingformer_pool")])
def test_bad_options_are_refused_naming_the_option(flag, values, field):
    """One line naming the option, from the unit and from a model built with it."""
    with pytest.raises(ValueError) as error:
        PoolingformerAttention(16, 4, *values)
    assert flag in str(error.value) and "\n" not in str(error.value)
    bad = dict(zip(("poolingformer_window", "poolingformer_pool_window", "poolingformer_pool"), values))[field]
    with pytest.raises(ValueError, match=flag):
        tiny_model("poolingformer_100m", **{field: bad})


def test_heads_must_split_the_width():
    with pytest.raises(ValueError, match="divisible"):
        PoolingformerAttention(10, 4, 4, 16, 4)


def test_the_preset_pairs_it_with_the_attention_decoder():
    args = tiny_model("poolingformer_100m").args
    assert (args.encoder_mixer, args.decoder_mixer, args.poolingformer_window, args.poolingformer_pool_window,
            args.poolingformer_pool) == ("poolingformer", "attention", 4, 16, 4)
    model = tiny_model("poolingformer_100m", poolingformer_pool=2)
    assert model.encoder.layers[0].mixer.pool == 2
    assert sum(key.endswith("mixer.pool_weight") for key in model.state_dict()) == 2  # the 2 encoder layers
