"""Linformer attention: fast path (E K, F V as matmuls) vs the per-sentence sums of the paper's formula, padding and
left padding, the maximum length, the refusal to serve in a decoder (no causal form), and linformer's
``LinformerSelfAttention``."""
import pytest
import torch
import torch.nn.functional as F
from linformer import LinformerSelfAttention

from lite.modules import MixerSpec
from lite.modules.linformer import Linformer, linformer_from_spec
from tests.conftest import assert_close, left_padding, tiny_model
from tests.lite.mixer_checks import assert_padded_frames_do_not_leak


def make_unit(max_len: int = 40, projected: int = 5) -> Linformer:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform (E, F smaller: each
    row sums up to 40 frames, and float32 sums of large terms would differ by more than 1e-5 between the two paths)."""
    unit = Linformer(16, 2, max_len, projected).eval()
    with torch.no_grad():
        for p in unit.parameters():
            p.normal_(0.0, 0.5)
        unit.proj_key.normal_(0.0, 0.15)
        unit.proj_value.normal_(0.0, 0.15)
    return unit


@pytest.mark.parametrize("length", [1, 7, 33, 40])
def test_fast_path_matches_reference(length):
    unit = make_unit()
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(6, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_formula():
    """H = C = D = 1, k = 2, W = 1, E = F = [[1, 0], [0, 1]], x = (a, b): K' = V' = (a, b); query i weighs them by
    softmax(x_i a, x_i b)."""
    unit = Linformer(1, 1, 2, 2).eval()
    with torch.no_grad():
        unit.qkv.weight.fill_(1.0)
        unit.qkv.bias.zero_()
        unit.out_proj.weight.fill_(1.0)
        unit.out_proj.bias.zero_()
        unit.proj_key.copy_(torch.eye(2))
        unit.proj_value.copy_(torch.eye(2))
    a, b = 0.5, -1.5
    rows = [torch.softmax(torch.tensor([xi * a, xi * b]), 0) @ torch.tensor([a, b]) for xi in (a, b)]
    x = torch.tensor([a, b]).view(2, 1, 1)
    assert_close(unit.reference_forward(x), torch.stack(rows).view(2, 1, 1))
    assert_close(unit(x), torch.stack(rows).view(2, 1, 1))


@pytest.mark.parametrize("length", [1, 7, 40])
def test_matches_the_linformer_package(length):
    """Our output at a sentence's real frames is linformer's ``LinformerSelfAttention`` (lucidrains) on that sentence
    alone: the package has no padding mask, and ours counts positions from the first real token, so a left-padded
    sentence projects as alone. Its E, F are our proj_key, proj_value transposed ([N, k], sliced to the first T rows
    alike). Its q, k, v projections have no bias: its input gets H more channels, (1, 0), and the weight column of
    the 1 holds our biases (H, not 1, so that the width stays divisible by the heads; dim_head keeps D); its output's
    extra channels are dropped."""
    unit = make_unit()
    theirs = LinformerSelfAttention(16 + 2, 40, k=5, heads=2, dim_head=8).eval()
    with torch.no_grad():
        for linear, weight, bias in zip((theirs.to_q, theirs.to_k, theirs.to_v), unit.qkv.weight.chunk(3),
                                        unit.qkv.bias.chunk(3)):
            linear.weight.copy_(F.pad(torch.cat([weight, bias.unsqueeze(1)], dim=1), (0, 1)))  # [C, C + H]
        theirs.proj_k.copy_(unit.proj_key.t())  # [N, k]
        theirs.proj_v.copy_(unit.proj_value.t())
        theirs.to_out.weight[:16].copy_(unit.out_proj.weight)  # [C + H, C]: the first C outputs are ours
        theirs.to_out.bias[:16].copy_(unit.out_proj.bias)
    x = torch.randn(length, 2, 16)  # [T, B, C]
    mask = left_padding(2, length, pads=min(5, length - 1))
    ours = unit(x, mask)
    for b in range(2):
        sentence = x[~mask[b], b]  # [T_b, C]
        constant = F.pad(torch.ones(len(sentence), 1), (0, 1))  # [T_b, H]: (1, 0)
        expected = theirs(torch.cat([sentence, constant], dim=1).unsqueeze(0))[0, :, :16]  # [T_b, C]
        assert_close(ours[~mask[b], b], expected)


def test_every_query_sees_every_frame():
    """Guard against vacuous parity: changing the last frame moves every output (no causal form)."""
    unit = make_unit()
    x = torch.randn(9, 1, 16)
    other = x.clone()
    other[-1] += 1.0
    assert (unit(other) - unit(x))[:-1].abs().amax(dim=(1, 2)).min() > 1e-4


def test_padded_frames_do_not_leak():
    unit = make_unit()
    assert_padded_frames_do_not_leak(unit)


def test_left_padding_changes_nothing():
    """Positions count from the first real token: a sentence alone and left-padded project alike."""
    unit = make_unit()
    x = torch.randn(6, 1, 16)
    padded = torch.cat([torch.randn(4, 1, 16), x])
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, :4] = True
    assert_close(unit(padded, mask)[4:], unit(x))


def test_longer_inputs_are_refused_naming_the_flag():
    unit = make_unit(max_len=8)
    unit(torch.randn(8, 1, 16))
    with pytest.raises(ValueError, match="9 frames is longer than --linformer-max-len 8"):
        unit(torch.randn(9, 1, 16))


def test_no_incremental_state_and_no_causal_build():
    with pytest.raises(ValueError, match="no causal form"):
        make_unit()(torch.randn(1, 1, 16), incremental_state={})
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1,
                     linformer_max_len=12, linformer_k=3)
    with pytest.raises(ValueError, match="no causal form"):
        linformer_from_spec(spec)


def test_builder_reads_the_spec():
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=False, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1,
                     linformer_max_len=12, linformer_k=3)
    unit = linformer_from_spec(spec)
    assert (unit.num_heads, unit.max_len, unit.projected) == (4, 12, 3)
    assert unit.proj_key.shape == unit.proj_value.shape == (3, 12)
    with pytest.raises(ValueError, match="divisible"):
        Linformer(10, 4, 8, 2)
    with pytest.raises(ValueError, match="--linformer-k"):
        Linformer(16, 4, 8, 0)


def test_the_preset_pairs_it_with_the_attention_decoder():
    args = tiny_model("linformer_100m").args
    assert (args.encoder_mixer, args.decoder_mixer, args.linformer_k, args.linformer_max_len) == \
        ("linformer", "attention", 32, 256)


def test_the_encoder_reads_at_most_max_len_positions():
    """The encoder reports the Linformer's length as its max positions (translators truncate sources there); the
    attention decoder keeps its own."""
    model = tiny_model("linformer_100m", linformer_max_len=8, linformer_k=3)
    assert model.encoder.max_positions() == 8 and model.decoder.max_positions() == model.decoder.max_target_positions
