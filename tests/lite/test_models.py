"""Every registered lite architecture: stepping == full causal pass, padding invariance, beam search."""
import pytest
import torch
from fairseq.modules import MultiheadAttention
from fairseq.sequence_generator import SequenceGenerator

from tests.conftest import LITE_ARCHS, assert_close, tiny_dictionary, tiny_model


def test_registry_holds_the_issue_presets():
    expected = {"lsra_iwslt_160", "lsra_iwslt_240", "lsra_iwslt_320", "lsra_wmt_200", "lsra_wmt_408",
                "lsra_wmt_496", "transformer_d128", "transformer_d256", "transformer_d320",
                "flash_quad_100m", "flash_quad_500m", "flash_100m", "flash_500m", "fastformer_100m", "fastformer_500m"}
    assert expected <= set(LITE_ARCHS)


def _source(dictionary, batch=2, length=5):
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (batch, length))
    tokens[:, -1] = dictionary.eos()
    return tokens


@pytest.mark.parametrize("arch", LITE_ARCHS)
@pytest.mark.parametrize("length", [1, 7, 33])
def test_stepping_matches_full_causal_pass(arch, length):
    d = tiny_dictionary()
    model = tiny_model(arch, d)
    src = _source(d)
    encoder_out = model.encoder(src)
    prev = torch.randint(d.nspecial, len(d), (2, length))
    prev[:, 0] = d.eos()
    full, _ = model.decoder(prev, encoder_out)  # [B, T, V]
    state = {}
    steps = torch.cat([model.decoder(prev[:, :t + 1], encoder_out, incremental_state=state)[0]
                       for t in range(length)], dim=1)
    assert_close(steps, full)


# heads x head dim != width everywhere (as pruning leaves them): LSRA and cross attention, dynamic conv + GLU on
# conv heads x R channels, encoder/decoder self-attention, GAU with its own U/V width
INNER_WIDTHS = {
    "lsra_wmt_200": dict(mixer_attention_heads=3, mixer_attention_head_dim=5, decoder_attention_heads=3,
                         decoder_attention_head_dim=4, conv_heads=3, conv_head_dim=3),
    "lsra_iwslt_160": dict(mixer_attention_heads=1, mixer_attention_head_dim=6, conv_heads=2, conv_head_dim=5),
    "transformer_d128": dict(mixer_attention_heads=None, encoder_attention_heads=3, encoder_attention_head_dim=4,
                             decoder_attention_heads=3, decoder_attention_head_dim=7),
    "flash_100m": dict(gau_hidden_dim=11, decoder_attention_heads=1, decoder_attention_head_dim=6),
}


@pytest.mark.parametrize("arch", list(INNER_WIDTHS))
def test_set_head_dims_and_inner_widths_build_and_step(arch):
    d = tiny_dictionary()
    model = tiny_model(arch, d, **INNER_WIDTHS[arch])
    layer, args = model.decoder.layers[0], model.args
    for attn in (m for m in model.modules() if isinstance(m, MultiheadAttention)):
        inner = attn.num_heads * attn.head_dim
        assert attn.q_proj.out_features == attn.k_proj.out_features == attn.out_proj.in_features == inner
        assert attn.scaling == attn.head_dim ** -0.5
    if args.decoder_attention_head_dim:
        cross = layer.cross_attention
        assert (cross.num_heads, cross.head_dim) == (args.decoder_attention_heads, args.decoder_attention_head_dim)
        assert cross.k_proj.weight.shape == (cross.num_heads * cross.head_dim, 16)
    if args.mixer_attention_head_dim:
        attn = layer.mixer.attention.attn
        assert (attn.num_heads, attn.head_dim) == (args.mixer_attention_heads, args.mixer_attention_head_dim)
        assert attn.q_proj.weight.shape == (attn.num_heads * attn.head_dim, 8)
    if args.conv_head_dim:
        branch = layer.mixer.conv
        inner = args.conv_heads * args.conv_head_dim
        assert branch.conv.channels == inner and branch.linear2.weight.shape == (8, inner)
        assert branch.linear1.weight.shape == ((2 if args.conv_glu else 1) * inner, 8)
    if args.gau_hidden_dim:
        assert layer.mixer.proj.weight.shape == (2 * 11 + 8, 16) and layer.mixer.out_proj.weight.shape == (16, 11)
    src = _source(d)
    encoder_out = model.encoder(src)
    prev = torch.randint(d.nspecial, len(d), (2, 7))
    prev[:, 0] = d.eos()
    full, _ = model.decoder(prev, encoder_out)
    state = {}
    steps = torch.cat([model.decoder(prev[:, :t + 1], encoder_out, incremental_state=state)[0] for t in range(7)], 1)
    assert_close(steps, full)


def test_unset_head_dims_build_fairseqs_own_attention():
    """None (every preset): the module fairseq builds, fused kernel and all, whatever the heads."""
    model = tiny_model("transformer_d128", mixer_attention_heads=None, encoder_attention_head_dim=8)  # 2 x 8 = 16
    for attn in (model.encoder.layers[0].mixer.attn, model.decoder.layers[0].cross_attention):
        assert attn.embed_dim == 16 and attn.head_dim == 8 and not attn.skip_embed_dim_check


@pytest.mark.parametrize("arch", LITE_ARCHS)
def test_decoder_is_causal(arch):
    d = tiny_dictionary()
    model = tiny_model(arch, d)
    encoder_out = model.encoder(_source(d))
    prev = torch.randint(d.nspecial, len(d), (2, 8))
    changed = prev.clone()
    changed[:, 5:] = d.nspecial  # the future differs
    assert_close(model.decoder(changed, encoder_out)[0][:, :5], model.decoder(prev, encoder_out)[0][:, :5])


@pytest.mark.parametrize("arch", LITE_ARCHS)
def test_left_padding_changes_nothing(arch):
    """A sentence alone and the same sentence left-padded in a batch encode and decode alike."""
    d = tiny_dictionary()
    model = tiny_model(arch, d)
    short, long = _source(d, 1, 4), _source(d, 1, 9)
    padded = torch.cat([torch.full((1, 5), d.pad()), short], dim=1)
    batch = torch.cat([padded, long])  # [2, 9], first row left-padded
    alone = model.encoder(short)["encoder_out"][0][:, 0]  # [4, C]
    in_batch = model.encoder(batch)["encoder_out"][0][5:, 0]
    assert_close(in_batch, alone)
    prev = torch.tensor([[d.eos(), 7, 8]])
    out_alone = model.decoder(prev, model.encoder(short))[0]
    out_batch = model.decoder(prev.repeat(2, 1), model.encoder(batch))[0][:1]
    assert_close(out_batch, out_alone)


@pytest.mark.parametrize("arch", ["lsra_iwslt_160", "lsra_wmt_200", "transformer_d128", "flash_quad_100m",
                                  "flash_100m", "fastformer_100m", "local_100m",
                                  "synthesizer_dense_100m", "synthesizer_random_100m", "strided_100m",
                                  "longformer_100m", "bigbird_100m", "isab_100m", "routing_100m",
                                  "sinkhorn_100m", "poolingformer_100m", "reformer_100m"])
def test_beam_search_scores_match_a_full_forward(arch):
    """SequenceGenerator (incremental states reordered across beams) scores each hypothesis exactly as a
    teacher-forced pass over the same tokens does."""
    d = tiny_dictionary()
    model = tiny_model(arch, d)
    src = _source(d, batch=3, length=6)
    generator = SequenceGenerator([model], d, beam_size=4, max_len_b=12, len_penalty=1.0)
    hypos = generator.generate([model], {"net_input": {"src_tokens": src, "src_lengths": torch.full((3,), 6)}})
    for i, nbest in enumerate(hypos):
        assert len(nbest) == 4
        for hypo in nbest:
            tokens = hypo["tokens"]  # ends with <eos>
            prev = torch.cat([torch.tensor([d.eos()]), tokens[:-1]]).unsqueeze(0)
            logits, _ = model(src[i:i + 1], torch.tensor([6]), prev)
            lprobs = model.get_normalized_probs((logits, None), log_probs=True)[0]
            token_scores = lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            assert_close(hypo["positional_scores"], token_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [4, 5])
def test_flash_decoder_steps_across_many_chunk_boundaries(chunk_size):
    """A whole FLASH model, 33 steps over chunks of 4 (8 boundaries) and of 5 (which does not divide 33)."""
    d = tiny_dictionary()
    model = tiny_model("flash_100m", d, chunk_size=chunk_size)
    encoder_out = model.encoder(_source(d))
    prev = torch.randint(d.nspecial, len(d), (2, 33))
    prev[:, 0] = d.eos()
    state = {}
    steps = torch.cat([model.decoder(prev[:, :t + 1], encoder_out, incremental_state=state)[0] for t in range(33)], 1)
    assert_close(steps, model.decoder(prev, encoder_out)[0])
