"""ISAB (induced set attention): fast path (m learned inducing points against the frames, the frames against the m
summaries) vs the one-query-one-head-at-a-time reference, vs torch's own multi-head attention and vs isab-pytorch's
attention blocks, padding, no positions (a permutation of the frames permutes the outputs), every frame reaching every
output, the option's checks, and no decoder use (no causal form)."""
import pytest
import torch
from isab_pytorch import ISAB
from torch import nn

from lite.modules import CAUSAL_MIXERS, MIXERS, MixerSpec
from lite.modules.isab import InducedSetAttention, isab_from_spec
from tests.conftest import assert_close, left_padding, tiny_model
from tests.lite.mixer_checks import assert_padded_frames_do_not_leak

POINTS = 3


def make_unit(points: int = POINTS, embed_dim: int = 16, heads: int = 4) -> InducedSetAttention:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform."""
    unit = InducedSetAttention(embed_dim, heads, points).eval()
    with torch.no_grad():
        unit.inducing.normal_(0.0, 1.0)
        for linear in (unit.induce_query, unit.frame_proj, unit.summary_proj, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
        unit.induce_norm.weight.normal_(1.0, 0.2)
        unit.induce_norm.bias.normal_(0.0, 0.1)
    return unit


def spec(**fields) -> MixerSpec:
    return MixerSpec(**{"embed_dim": 16, "attention_heads": 4, "causal": False, "kernel_size": 3,
                        "conv_type": "lightweight", "conv_heads": 2, "conv_glu": True, "weight_softmax": True,
                        "weight_dropout": 0.0, "attention_dropout": 0.0, **fields})


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 13, 33])  # below, at and above m = 3
def test_fast_path_matches_reference(length):
    unit = make_unit()
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(5, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


@pytest.mark.parametrize("points,heads", [(1, 1), (1, 4), (2, 2), (8, 4), (40, 8)])  # m from 1 to more than T
def test_other_point_and_head_counts_match_reference(points, heads):
    unit = make_unit(points=points, heads=heads)
    x = torch.randn(11, 3, 16)
    mask = left_padding(3, 11, pads=4)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_matches_torch_multihead_attention():
    """The definition written with torch.nn.MultiheadAttention, which shares no code with the unit: the inducing
    points' queries against the frames (no output projection: identity), plus those queries, LayerNorm; then the
    frames against the summaries, with W_o."""
    unit, c = make_unit(), 16
    x = torch.randn(9, 2, c)
    mask = left_padding(2, 9, pads=3)
    first, second = nn.MultiheadAttention(c, 4), nn.MultiheadAttention(c, 4)
    w_q2, w_k1, w_v1 = unit.frame_proj.weight.split(c)
    b_q2, b_k1, b_v1 = unit.frame_proj.bias.split(c)
    with torch.no_grad():
        first.in_proj_weight.copy_(torch.cat([torch.eye(c), w_k1, w_v1]))  # queries given already projected
        first.in_proj_bias.copy_(torch.cat([torch.zeros(c), b_k1, b_v1]))
        first.out_proj.weight.copy_(torch.eye(c))
        first.out_proj.bias.zero_()
        second.in_proj_weight.copy_(torch.cat([w_q2, unit.summary_proj.weight]))
        second.in_proj_bias.copy_(torch.cat([b_q2, unit.summary_proj.bias]))
        second.out_proj.load_state_dict(unit.out_proj.state_dict())
        queries = unit.induce_query(unit.inducing).unsqueeze(1).expand(-1, 2, -1)  # [m, B, C]
        summary = unit.induce_norm(queries + first(queries, x, x, key_padding_mask=mask)[0])  # [m, B, C]
        want = second(x, summary, summary)[0].masked_fill(mask.t().unsqueeze(-1), 0.0)  # [T, B, C]
    assert_close(unit(x, mask), want)


def test_matches_the_isab_package():
    """isab-pytorch's ISAB (lucidrains), its two attention blocks called one at a time on our weights. What differs,
    and how it is bridged: its head dim is fixed at 64 (ISAB passes no dim_head), so C = 128 with 2 heads. Its
    projections have no biases: our key biases cancel (a softmax ignores a shift of its row), our value biases pass
    through (the weights sum to one) and are added after, and the queries come already projected (to_q the identity:
    Q_I as its latents, X W_q2 + b_q2 into the second block). Its first block ends in an output projection, with no
    residual or LayerNorm, where ours adds Q_I and normalizes (as the authors' implementation): no weights express
    that, so its to_out is the identity there and our residual and LayerNorm go between the blocks, which its
    ISAB.forward cannot do. Its mask is True at real frames, and it leaves the outputs at pads as they come. In
    float64: outputs reach ~95 here, where float32 rounding alone (ours against our reference too) exceeds 1e-5."""
    unit, c = make_unit(embed_dim=128, heads=2).double(), 128
    theirs = ISAB(dim=c, heads=2, num_latents=POINTS).double().eval()
    x = 0.05 * torch.randn(9, 2, c, dtype=torch.float64)  # [T, B, C], small: logits of std ~ 1.7, not saturated
    mask = left_padding(2, 9, pads=3)
    w_q2, w_k1, w_v1 = unit.frame_proj.weight.split(c)
    b_q2, _, b_v1 = unit.frame_proj.bias.split(c)
    with torch.no_grad():
        theirs.latents.copy_(unit.induce_query(unit.inducing))  # Q_I [m, C]
        theirs.attn1.to_q.weight.copy_(torch.eye(c))
        theirs.attn1.to_kv.weight.copy_(torch.cat([w_k1, w_v1]))
        theirs.attn1.to_out.weight.copy_(torch.eye(c))
        theirs.attn2.to_q.weight.copy_(torch.eye(c))
        theirs.attn2.to_kv.weight.copy_(unit.summary_proj.weight)  # W_k2, W_v2
        theirs.attn2.to_out.weight.copy_(unit.out_proj.weight)
        frames = x.transpose(0, 1)  # [B, T, C]
        latents = theirs.latents.expand(2, -1, -1)  # [B, m, C]
        summary = unit.induce_norm(latents + theirs.attn1(latents, frames, mask=~mask) + b_v1)  # H [B, m, C]
        b_v2 = unit.summary_proj.bias[c:]
        out = theirs.attn2(frames @ w_q2.t() + b_q2, summary) + unit.out_proj(b_v2)  # [B, T, C]
    assert_close(unit(x, mask), out.masked_fill(mask.unsqueeze(-1), 0.0).transpose(0, 1))


def test_one_inducing_point_gives_every_frame_the_same_output():
    """m = 1: the second softmax has one key, so every real frame reads the one summary alike."""
    unit = make_unit(points=1)
    out = unit(torch.randn(6, 1, 16))
    assert_close(out, out[:1].expand_as(out))


def test_every_frame_reaches_every_output():
    """The summaries read the whole sentence: changing any frame, later ones included, changes every frame's output
    (so a decoder would look ahead)."""
    unit = make_unit()
    x = torch.randn(10, 1, 16)
    base = unit(x)
    for frame in range(10):
        changed = x.clone()
        changed[frame] += 1.0
        moved = unit(changed)
        assert ((moved - base).abs().amax(-1) > 1e-4).all(), frame


def test_a_permutation_of_the_frames_permutes_the_outputs():
    """A set operation: no positions, so the frames' order changes nothing but the outputs' order."""
    unit = make_unit()
    x = torch.randn(12, 2, 16)
    order = torch.randperm(12)
    assert_close(unit(x[order]), unit(x)[order])


def test_left_padding_changes_nothing():
    unit = make_unit()
    x = torch.randn(17, 1, 16)
    padded = torch.cat([torch.randn(6, 1, 16), x])
    mask = torch.zeros(1, 23, dtype=torch.bool)
    mask[0, :6] = True
    assert_close(unit(padded, mask)[6:], unit(x))


def test_padded_frames_do_not_leak():
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero."""
    unit = make_unit()
    x, mask, y = assert_padded_frames_do_not_leak(unit)
    assert_close(y, unit.reference_forward(x, mask))
    assert_close(y[:, 1:][3:], unit(x[3:, 1:]))  # the sentence alone


def test_a_sentence_of_pads_only_stays_finite():
    unit = make_unit()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    y = unit(torch.randn(5, 2, 16), mask)
    assert torch.isfinite(y).all()
    assert_close(y[:, 1], torch.zeros(5, 16))


def test_the_inducing_points_are_parameters_in_the_state_dict():
    unit = make_unit(points=5)
    assert unit.inducing.shape == (5, 16) and unit.inducing.requires_grad
    assert torch.equal(unit.state_dict()["inducing"], unit.inducing)
    model = tiny_model("isab_100m")
    assert sum(key.endswith("mixer.inducing") for key in model.state_dict()) == 2  # the 2 encoder layers
    assert model.encoder.layers[0].mixer.inducing.shape == (8, 16)


def test_no_incremental_state_and_no_causal_build():
    with pytest.raises(ValueError, match="no causal form"):
        make_unit()(torch.randn(1, 1, 16), incremental_state={})
    with pytest.raises(ValueError, match="no causal form"):
        isab_from_spec(spec(causal=True))
    assert "isab" in MIXERS and "isab" not in CAUSAL_MIXERS


def test_builder_reads_the_spec():
    unit = isab_from_spec(spec(attention_dropout=0.1, isab_inducing_points=5))
    assert (unit.embed_dim, unit.num_heads, unit.inducing_points, unit.dropout) == (16, 4, 5, 0.1)
    assert spec().isab_inducing_points == 8
    assert isab_from_spec(spec(attention_heads=2)).num_heads == 2


@pytest.mark.parametrize("points", [0, -1])
def test_bad_inducing_points_are_refused_naming_the_option(points):
    with pytest.raises(ValueError) as error:
        InducedSetAttention(16, 4, points)
    assert str(error.value) == f"isab: --isab-inducing-points must be positive, got {points}"
    with pytest.raises(ValueError, match=f"^isab: --isab-inducing-points must be positive, got {points}$"):
        tiny_model("isab_100m", isab_inducing_points=points)


def test_bad_heads_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        InducedSetAttention(10, 4, 2)
    with pytest.raises(ValueError, match="--\\*-attention-head-dim"):
        isab_from_spec(spec(attention_head_dim=8))


def test_the_heads_follow_the_mixer_heads_option():
    """--mixer-attention-heads sets the heads, else the encoder's attention heads, as for the other attentions."""
    assert tiny_model("isab_100m", mixer_attention_heads=4).encoder.layers[0].mixer.num_heads == 4
    assert tiny_model("isab_100m", mixer_attention_heads=None,
                      encoder_attention_heads=8).encoder.layers[0].mixer.num_heads == 8


def test_the_preset_pairs_it_with_the_attention_decoder():
    args = tiny_model("isab_100m").args
    assert (args.encoder_mixer, args.decoder_mixer, args.isab_inducing_points) == ("isab", "attention", 8)
    assert tiny_model("isab_100m", isab_inducing_points=3).encoder.layers[1].mixer.inducing.shape == (3, 16)
