"""Memory-compressed attention: fast path (keys and values through a strided Conv1d) vs the per-sentence, tap-by-tap
sums of the paper's formula, padding and left padding (windows counted from the first real token), and the refusal to
serve in a decoder (no causal form here), and memory-compressed-attention's ``MemoryCompressedAttention``."""
import pytest
import torch
import torch.nn.functional as F
from memory_compressed_attention import MemoryCompressedAttention as PackageAttention

from lite.modules import CAUSAL_MIXERS, MixerSpec
from lite.modules.memory_compressed import MemoryCompressedAttention, memory_compressed_from_spec
from tests.conftest import assert_close, left_padding, tiny_model
from tests.lite.mixer_checks import assert_padded_frames_do_not_leak

STRIDE = 3
C, H, D = 16, 2, 8  # make_unit's sizes
WIDTH = C + H  # the package twin's width: one more channel a head


def make_unit(stride: int = STRIDE) -> MemoryCompressedAttention:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform."""
    unit = MemoryCompressedAttention(16, 2, stride).eval()
    with torch.no_grad():
        for p in unit.parameters():
            p.normal_(0.0, 0.3)
    return unit


@pytest.mark.parametrize("length", [1, 3, 7, 13, 33])
def test_fast_path_matches_reference(length):
    unit = make_unit()
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(5, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_formula():
    """C = H = D = 1, stride 2, W_q = 0 (uniform weights over the slots), W_k = W_v = W_o = 1, taps (1, 10), no bias:
    x = (1, 2, 4, 8, 16) gives slots 1 + 20, 4 + 80, 16 (+ a zeroed pad); every query averages them: 121 / 3."""
    unit = MemoryCompressedAttention(1, 1, 2).eval()
    with torch.no_grad():
        unit.qkv.weight.copy_(torch.tensor([[0.0], [1.0], [1.0]]))
        unit.qkv.bias.zero_()
        unit.out_proj.weight.fill_(1.0)
        unit.out_proj.bias.zero_()
        for conv in (unit.compress_key, unit.compress_value):
            conv.weight.copy_(torch.tensor([[[1.0, 10.0]]]))
            conv.bias.zero_()
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]).view(5, 1, 1)
    want = torch.full((5, 1, 1), 121 / 3)
    assert_close(unit.reference_forward(x), want)
    assert_close(unit(x), want)


def package_twin(unit: MemoryCompressedAttention) -> PackageAttention:
    """The package's module computing ``unit`` (whose key and value compression is one Conv1d grouped by head, as the
    package's), through its weights on WIDTH channels: each head's D, then one extra. Its input is x, then (1, 0):
    that column holds our q, k, v biases (its to_qkv has none). It scales by 1 / sqrt(WIDTH), not 1 / sqrt(D): W_q
    and b_q are multiplied by sqrt(WIDTH / D) = 1.5. It prepends a null slot that every query sees: each head's extra
    query channel is 1 and the null key's -1e4, so the null slot's weight is exp(-2357) = 0 (the real slots' extra
    key and value channels are 0)."""
    twin = PackageAttention(WIDTH, heads=H, compression_factor=STRIDE).eval()
    channels = torch.arange(WIDTH).view(H, D + 1)
    ours, extra = channels[:, :D].flatten(), channels[:, D]  # [C], [H]: where our channels and the extra ones go
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        rows = twin.to_qkv.weight.chunk(3)  # q, k, v [WIDTH, WIDTH] (views)
        for part, weight, bias, factor in zip(rows, unit.qkv.weight.chunk(3), unit.qkv.bias.chunk(3),
                                              ((WIDTH / D) ** 0.5, 1.0, 1.0)):
            part[ours, :C] = weight * factor
            part[ours, C] = bias * factor
        rows[0][extra, C] = 1.0
        twin.null_k[0, 0, extra] = -1e4
        conv = twin.compress_fn.conv  # weight [WIDTH, D + 1, s]: groups = H
        blocks = unit.compress_key.weight.view(H, D, H, D, STRIDE)  # [H, D, H, D, s]
        conv.weight.view(H, D + 1, D + 1, STRIDE)[:, :D, :D] = torch.stack([blocks[h, :, h] for h in range(H)])
        conv.bias.view(H, D + 1)[:, :D] = unit.compress_key.bias.view(H, D)
        twin.to_out.weight[:C, ours] = unit.out_proj.weight  # the first C outputs are ours
        twin.to_out.bias[:C] = unit.out_proj.bias
    return twin


@pytest.mark.parametrize("length", [1, 3, 7, 12])
def test_matches_memory_compressed_attention_package(length):
    """Our output at a sentence's real frames is memory-compressed-attention's ``MemoryCompressedAttention``
    (lucidrains) on that sentence alone, ours restricted to what the package can express: its one compression, for
    keys and values alike, is grouped by head, so our cross-head taps are zeroed and the value's conv is the key's.
    The rest is bridged by ``package_twin`` and the input. The package pads an incomplete window at the front (its
    windows end at the last frame), ours at the end: its input gets (-T) mod s zero frames appended (zero keys and
    values, no bias), which makes its windows ours. Its padding mask is not used: it hides every real slot from a
    real query (``mask_q < mask_k`` on True = keep), so sentences go alone; ours counts windows from the first real
    token, so a left-padded one compresses as alone. Not compared: the causal form (ours has none; the package's
    shows a query the slots whose window ends at or before it, none of its pending window)."""
    unit = make_unit()
    with torch.no_grad():
        same_head = torch.block_diag(*[torch.ones(D, D)] * H)  # [C, C]
        unit.compress_key.weight.mul_(same_head.unsqueeze(-1))  # [C, C, s]: no cross-head taps
        unit.compress_value.load_state_dict(unit.compress_key.state_dict())
    twin = package_twin(unit)
    x = torch.randn(length, 2, C)  # [T, B, C]
    mask = left_padding(2, length, pads=min(5, length - 1))
    ours = unit(x, mask)
    for b in range(2):
        sentence = x[~mask[b], b]  # [T_b, C]
        frames = len(sentence)
        inputs = torch.cat([sentence, F.pad(torch.ones(frames, 1), (0, H - 1))], dim=1)  # [T_b, WIDTH]: x, (1, 0)
        inputs = F.pad(inputs, (0, 0, 0, -frames % STRIDE))  # then zero frames up to a multiple of s
        assert_close(ours[~mask[b], b], twin(inputs.unsqueeze(0))[0, :frames, :C])


def test_keys_are_compressed_stride_fold():
    """The window boundaries are real: changing one frame changes exactly one slot (every query sees it), and a
    sentence of 7 frames has ceil(7 / 3) = 3 slots."""
    unit = make_unit()
    x = torch.randn(7, 1, 16)
    q, k, v = unit.qkv(x.transpose(0, 1)).chunk(3, dim=-1)
    slots = unit.compress_key(torch.nn.functional.pad(k, (0, 0, 0, 2)).transpose(1, 2))  # [1, C, G]
    assert slots.shape == (1, 16, 3)
    changed = k.clone()
    changed[0, 4] += 1.0  # window 1 (frames 3..5)
    after = unit.compress_key(torch.nn.functional.pad(changed, (0, 0, 0, 2)).transpose(1, 2))
    moved = (after - slots).abs().amax(dim=1)[0]
    assert moved[1] > 1e-4 and moved[0] == 0 and moved[2] == 0


def test_padded_frames_do_not_leak():
    unit = make_unit()
    assert_padded_frames_do_not_leak(unit)


def test_left_padding_changes_nothing():
    """Windows count from the first real token: a sentence alone and left-padded compress alike (4 pads: not a
    multiple of the stride, so windows counted from index 0 would differ)."""
    unit = make_unit()
    x = torch.randn(7, 1, 16)
    padded = torch.cat([torch.randn(4, 1, 16), x])
    mask = torch.zeros(1, 11, dtype=torch.bool)
    mask[0, :4] = True
    assert_close(unit(padded, mask)[4:], unit(x))


def test_no_incremental_state_and_no_causal_build():
    with pytest.raises(ValueError, match="no causal form"):
        make_unit()(torch.randn(1, 1, 16), incremental_state={})
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1,
                     compress_stride=2)
    with pytest.raises(ValueError, match="no causal form"):
        memory_compressed_from_spec(spec)
    assert "memory_compressed" not in CAUSAL_MIXERS


def test_builder_reads_the_spec():
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=False, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1,
                     compress_stride=2)
    unit = memory_compressed_from_spec(spec)
    assert (unit.num_heads, unit.head_dim, unit.stride) == (4, 4, 2)
    assert unit.compress_key.weight.shape == unit.compress_value.weight.shape == (16, 16, 2)
    with pytest.raises(ValueError, match="divisible"):
        MemoryCompressedAttention(10, 4, 2)
    with pytest.raises(ValueError, match="--compress-stride"):
        MemoryCompressedAttention(16, 4, 0)


def test_the_preset_pairs_it_with_the_attention_decoder():
    args = tiny_model("memory_compressed_100m").args
    assert (args.encoder_mixer, args.decoder_mixer, args.compress_stride) == ("memory_compressed", "attention", 3)
