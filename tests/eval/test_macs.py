"""eval/macs.py: the paper's MAC and parameter figures, a hand count, FlopCounterMode, budget presets, the CLI.

Expected numbers come from the Lite Transformer paper (pinned) and from ``reference_*`` below, a hand count
from the model args that shares no code with the torchprofile-based counter.
"""
from __future__ import annotations

import argparse
import json
import re
import warnings

import pytest
import torch
from fairseq.models import ARCH_CONFIG_REGISTRY
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

import lite.models.budgets  # noqa: F401  (registers the budget presets until lite/models imports them)
from eval import macs
from lite.models.budgets import BUDGET_PRESETS, FAMILIES
from tests.conftest import TINY, tiny_model

M = 1e6
# Lite Transformer paper (Table 3 / Figure 1, WMT): Mult-Adds at 30 + 30 tokens; params without embeddings
PAPER_MACS = {"lsra_wmt_200": 90.7 * M, "lsra_wmt_408": 360.6 * M, "lsra_wmt_496": 528.7 * M,
              "transformer_d128": 86.7 * M, "transformer_d256": 338.6 * M, "transformer_d320": 526.5 * M}
PAPER_PARAMS_NO_EMBED = {"lsra_wmt_200": 2.88 * M, "lsra_wmt_408": 11.74 * M, "lsra_wmt_496": 17.28 * M}
TINY_ARCHS = ["lsra_iwslt_160", "lsra_wmt_200", "transformer_d128"]  # lightweight conv, dynamic conv + GLU, attention


# ------------------------------------------------------------------------------------ hand count

def _args(arch: str, **overrides) -> argparse.Namespace:
    args = argparse.Namespace(**overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


def _kernels(args, side: str) -> list[int]:
    sizes = [int(k) for k in str(getattr(args, f"{side}_kernel_size_list")).split(",")]
    layers = getattr(args, f"{side}_layers")
    return (sizes * layers)[:layers] if len(sizes) == 1 else sizes[:layers]


def _mixer(args, side: str, queries: int, keys: int, kernel: int) -> int:
    """One mixer: attention on all channels, LSRA (attention on half, conv branch on half) or conv."""
    dim, mixer = getattr(args, f"{side}_embed_dim"), getattr(args, f"{side}_mixer")
    attn = {"attention": dim, "lsra": dim // 2, "conv": 0}[mixer]
    conv = dim - attn
    macs = queries * 4 * attn * attn + 2 * queries * keys * attn  # q, k, v, out projections; QK^T and AV
    if conv:
        macs += queries * conv * conv * (2 if args.conv_glu else 1) + queries * conv * conv  # linear1, linear2
        macs += queries * conv * kernel  # the taps
        if args.conv_type == "dynamic":
            macs += queries * conv * args.conv_heads * kernel  # weight_linear: C -> H*K
    return macs


def reference_paper_macs(args, src_len: int, tgt_len: int) -> tuple[int, int]:
    """(encoder, decoder) MACs, teacher forcing, the full T x T attention matrix, no embeddings/projection."""
    ce, cd = args.encoder_embed_dim, args.decoder_embed_dim
    encoder = sum(_mixer(args, "encoder", src_len, src_len, k) + 2 * src_len * ce * args.encoder_ffn_embed_dim
                  for k in _kernels(args, "encoder"))
    cross = 2 * tgt_len * cd * cd + 2 * src_len * ce * cd + 2 * tgt_len * src_len * cd  # q+out, k+v, QK^T+AV
    decoder = sum(_mixer(args, "decoder", tgt_len, tgt_len, k) + cross + 2 * tgt_len * cd * args.decoder_ffn_embed_dim
                  for k in _kernels(args, "decoder"))
    return encoder, decoder


def reference_decode_macs(args, src_len: int, tgt_len: int, beam: int, vocab: int) -> tuple[int, int, int]:
    """(encoder once, decoder steps, output projection) for incremental decoding on ``beam`` hypotheses."""
    ce, cd = args.encoder_embed_dim, args.decoder_embed_dim
    encoder, _ = reference_paper_macs(args, src_len, tgt_len)
    decoder = 0
    for k in _kernels(args, "decoder"):
        decoder += beam * 2 * src_len * ce * cd  # cross-attention keys/values of the memory, at step 1 only
        for t in range(1, tgt_len + 1):  # step t attends to t cached positions
            decoder += beam * (_mixer(args, "decoder", 1, t, k) + 2 * cd * cd + 2 * src_len * cd
                               + 2 * cd * args.decoder_ffn_embed_dim)
    return encoder, decoder, tgt_len * beam * cd * vocab


def test_reference_reproduces_the_paper():
    """The hand count alone gives the paper's figures: the protocol is understood, whatever the counter does."""
    for arch, expected in PAPER_MACS.items():
        assert sum(reference_paper_macs(_args(arch), 30, 30)) == pytest.approx(expected, rel=0.001), arch


# ------------------------------------------------------------------------------------ the counter

@pytest.mark.parametrize("arch", sorted(PAPER_MACS))
def test_paper_macs_and_params(arch):
    model = macs.build_arch(arch, vocab_size=100)
    measured = macs.paper_macs(model, 30, 30)
    assert measured.total == pytest.approx(PAPER_MACS[arch], rel=0.01)
    assert (measured.encoder, measured.decoder) == reference_paper_macs(model.args, 30, 30)
    if arch in PAPER_PARAMS_NO_EMBED:
        assert macs.count_params(model)[1] == pytest.approx(PAPER_PARAMS_NO_EMBED[arch], rel=0.01)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_hand_count_on_tiny_model(arch):
    model = tiny_model(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paper = macs.paper_macs(model, src_len=7, tgt_len=5)
        decode = macs.decode_macs(model, src_len=7, tgt_len=6, beam=3, every_step=True)
    assert not [w for w in caught if "not counted" in str(w.message)]  # every operator is known
    args = _args(arch, **TINY)
    assert (paper.encoder, paper.decoder) == reference_paper_macs(args, 7, 5)
    assert (decode.encoder, decode.decoder, decode.output_projection) == \
        reference_decode_macs(args, 7, 6, beam=3, vocab=len(model.decoder.dictionary))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_decode_shortcut_equals_every_step(arch):
    model = tiny_model(arch)
    for beam in (1, 4):
        assert macs.decode_macs(model, 5, 9, beam) == macs.decode_macs(model, 5, 9, beam, every_step=True)


def test_params_count_tied_embeddings_once():
    model = tiny_model("lsra_wmt_200")
    total, no_embed = macs.count_params(model)
    embedding = model.encoder.embed_tokens.weight
    assert model.decoder.output_projection.weight is embedding
    assert total - no_embed == embedding.numel()
    untied = tiny_model("lsra_wmt_200", share_all_embeddings=False, share_decoder_input_output_embed=False)
    total, no_embed = macs.count_params(untied)
    assert total - no_embed == 3 * embedding.numel()  # source, target and output tables


# ------------------------------------------------------------------------------------ FlopCounterMode

def _flop_counter_macs(module, inputs) -> int:
    # torch 2.13's FlopCounterMode has no formula for CPU's fused attention kernel: give it torch's own
    # (unwrapped: FlopCounterMode wraps custom formulas in its shape wrapper itself)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_flop_counter_agrees_but_for_dynamic_conv_taps(arch):
    model, src_len, tgt_len = tiny_model(arch), 7, 5
    source, target = torch.randn(src_len, 1, 16), torch.randn(tgt_len, 1, 16)
    mask = torch.zeros(1, src_len, dtype=torch.bool)
    args = _args(arch, **TINY)
    # DynamicConv's taps are a broadcast mul + sum, no matmul kernel: FlopCounterMode does not see them
    conv = 16 - 16 // 2  # the LSRA conv branch's channels
    dynamic = args.encoder_mixer == "lsra" and args.conv_type == "dynamic"
    taps = (conv * src_len * sum(_kernels(args, "encoder")), conv * tgt_len * sum(_kernels(args, "decoder"))) \
        if dynamic else (0, 0)
    for stack, inputs, missed in [(macs.EncoderLayers(model.encoder), (source, mask), taps[0]),
                                  (macs.DecoderLayers(model.decoder), (target, source, mask), taps[1])]:
        assert macs.count_macs(stack, inputs) - _flop_counter_macs(stack, inputs) == missed


# ------------------------------------------------------------------------------------ budget presets

def _budget_presets() -> list[tuple[str, int]]:
    found = []
    for arch in macs.lite_archs():
        match = re.fullmatch(r".+_(\d+)([mg])", arch)
        if match:
            found.append((arch, int(match.group(1)) * {"m": 10**6, "g": 10**9}[match.group(2)]))
    return found


def test_budget_registry_names_registered_presets():
    presets = dict(_budget_presets())
    assert {"lsra_100m", "lsra_500m", "transformer_100m", "transformer_500m"} <= set(presets)
    assert set(BUDGET_PRESETS) <= set(FAMILIES)
    for family, by_budget in BUDGET_PRESETS.items():
        for budget, arch in by_budget.items():
            assert presets.get(arch) == budget, f"{family}: {arch} is not registered or not named for {budget}"


@pytest.mark.parametrize("arch,budget", _budget_presets())
def test_budget_preset_fits_its_budget(arch, budget):
    measured = macs.paper_macs(macs.build_arch(arch, vocab_size=100)).total
    assert 0.9 * budget <= measured <= budget, f"{arch}: {measured:,} MACs, outside [0.9, 1] x {budget:,}"


def test_propose_dim_gives_the_preset(capsys):
    assert macs.main(["--family", "transformer", "--budget", "100M", "--json"]) == 0
    proposal = json.loads(capsys.readouterr().out)
    assert proposal["embed_dim"] == _args("transformer_100m").encoder_embed_dim == 136
    assert proposal["macs"] <= 100 * M < macs.family_macs("transformer", 136 + FAMILIES["transformer"].multiple)


@pytest.mark.parametrize("text,value", [("100M", 10**8), ("0.5G", 5 * 10**8), ("90000000", 9 * 10**7),
                                        ("500k", 5 * 10**5)])
def test_parse_budget(text, value):
    assert macs.parse_budget(text) == value


# ------------------------------------------------------------------------------------ CLI

def test_cli_json(capsys):
    assert macs.main(["--arch", "transformer_d128", "--src-len", "6", "--tgt-len", "5", "--vocab-size", "50",
                      "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for field in ("macs", "params", "params_no_embed", "decode_macs_beam1", "decode_macs_beam4"):
        assert isinstance(result[field], int), field
    args = _args("transformer_d128")
    assert result["macs"] == sum(reference_paper_macs(args, 6, 5))
    for beam in (1, 4):
        assert result[f"decode_macs_beam{beam}"] == sum(reference_decode_macs(args, 6, 5, beam, vocab=50))
    assert result["decode_macs_beam4"] > result["decode_macs_beam1"]
    assert result["bytes_fp32"] == 4 * result["params"]


def test_decode_includes_the_output_projection():
    model = tiny_model("lsra_wmt_200")
    vocab, dim = len(model.decoder.dictionary), 16
    one, four = (macs.decode_macs(model, 7, 6, beam) for beam in (1, 4))
    assert one.output_projection == 6 * dim * vocab and four.output_projection == 4 * 6 * dim * vocab
    assert four.total > one.total and one.encoder == four.encoder  # the encoder runs once either way


@pytest.mark.parametrize("argv,message", [(["--arch", "nope"], "not a lite_transformer architecture"),
                                          (["--family", "lsra"], "needs --budget"),
                                          (["--arch", "transformer_d128", "--budget", "1M"], "goes with --family"),
                                          (["--family", "lsra", "--budget", "lots"], "expected a number")])
def test_cli_errors_name_the_option(argv, message, capsys):
    assert macs.main(argv) == 2
    assert message in capsys.readouterr().err


def test_markdown_table():
    table = macs.markdown_table(["transformer_d128"], src_len=4, tgt_len=3, vocab_size=20).splitlines()
    assert table[0].startswith("| `--arch` | MACs (4+3) |") and table[1].startswith("|---")
    assert table[2].startswith("| `transformer_d128` |")


def test_cli_checkpoint(monkeypatch, capsys, tmp_path):
    import lite.translate

    model = tiny_model("lsra_wmt_200")
    model.args.arch = "lsra_wmt_200"
    monkeypatch.setattr(lite.translate, "load_checkpoint", lambda path, data=None: (model, None))
    assert macs.main(["--checkpoint", "any.pt", "--src-len", "5", "--tgt-len", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == "lsra_wmt_200" and result["vocab_size"] == len(model.decoder.dictionary)
    assert result["macs"] == sum(reference_paper_macs(_args("lsra_wmt_200", **TINY), 5, 4))
    monkeypatch.undo()
    assert macs.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
