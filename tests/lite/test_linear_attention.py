"""Linear attention, with the Linear Transformer's elu + 1 features and with Performer's FAVOR+ random features: fast
path (S, z sums / prefix sums) vs the attention-form reference, stepping (an RNN of constant state) vs the full causal
pass, beams, padding; the textbook formula; FAVOR+ estimates the softmax kernel and approximates softmax attention;
FAVOR+ against performer-pytorch."""
import pytest
import torch
from performer_pytorch.performer_pytorch import causal_linear_attention_noncuda, linear_attention, softmax_kernel

from lite.modules import MixerSpec
from lite.modules import linear_attention as linear_attention_module
from lite.modules.linear_attention import (STATE_NAMES, LinearAttention, causal_sums, feature_map,
                                          linear_attention_from_spec)
from lite.modules.performer import FavorFeatures, default_features, orthogonal_gaussian, performer_from_spec
from tests.conftest import assert_close, left_padding
from tests.lite.mixer_checks import assert_padded_frames_do_not_leak


@pytest.fixture(params=["linear", "performer"])
def kind(request) -> str:
    return request.param


def make_unit(causal: bool, kind: str = "linear", embed_dim: int = 16, heads: int = 2,
              features: int = 0) -> LinearAttention:
    """A small unit in eval mode whose kernel values phi(q) . phi(k) spread widely, so the weights are far from
    uniform."""
    head_dim = embed_dim // heads
    favor = FavorFeatures(head_dim, features or default_features(head_dim)) if kind == "performer" else None
    unit = LinearAttention(embed_dim, heads, causal=causal, features=favor).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    return unit


@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_matches_reference(causal, kind):
    unit = make_unit(causal, kind)
    x = torch.randn(33, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, 33, pads=6)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


@pytest.mark.parametrize("block", [1, 4, 8, 37, 64])
def test_blocks_give_the_prefix_sums(block):
    """The blocked causal pass equals S_i, z_i as prefix sums frame by frame, whatever the block (37 frames: blocks
    of 1, whole blocks and a padded last one, one block, one block larger than the sentence)."""
    q, k = torch.rand(2, 37, 3, 5, dtype=torch.float64), torch.rand(2, 37, 3, 5, dtype=torch.float64)
    v = torch.randn(2, 37, 3, 4, dtype=torch.float64)
    prefix_kv = torch.einsum("bthm,bthd->bthmd", k, v).cumsum(1)  # [B, T, H, M, D]
    out, norm = causal_sums(q, k, v, block)
    assert_close(out, torch.einsum("bthm,bthmd->bthd", q, prefix_kv), atol=1e-12, rtol=0)
    assert_close(norm, torch.einsum("bthm,bthm->bth", q, k.cumsum(1)), atol=1e-12, rtol=0)


def test_blocked_causal_pass_matches_reference(kind):
    unit = make_unit(True, kind)
    unit.block = 4  # 9 blocks, the last padded
    x, mask = torch.randn(33, 2, 16), left_padding(2, 33, pads=6)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_reference_is_the_textbook_formula():
    """C = H = D = 1, W_q = W_k = W_v = W_o = 1, biases 0, x = (a, b), causal: phi = elu + 1;
    frame 0: out = a (one value, weight 1); frame 1: out = (phi(b)phi(a) a + phi(b)phi(b) b) / (phi(b)phi(a) + phi(b)^2)."""
    unit = LinearAttention(1, 1, causal=True).eval()
    with torch.no_grad():
        unit.qkv.weight.fill_(1.0)
        unit.out_proj.weight.fill_(1.0)
    a, b = torch.tensor(0.7), torch.tensor(-1.3)
    pa, pb = feature_map(a), feature_map(b)
    second = (pb * pa * a + pb * pb * b) / (pb * pa + pb * pb)
    expected = torch.stack([a, second]).view(2, 1, 1)
    x = torch.stack([a, b]).view(2, 1, 1)
    assert_close(unit.reference_forward(x), expected)
    assert_close(unit(x), expected)


def test_feature_map_is_elu_plus_one():
    x = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    assert_close(feature_map(x), torch.where(x > 0, x + 1, torch.exp(x)))


def test_mixing_matters(kind):
    """Guard against vacuous parity: every frame's output depends on the other frames (non-causal)."""
    unit = make_unit(False, kind)
    x = torch.randn(9, 1, 16)
    x_other = x.clone()
    x_other[-1] += 1.0
    assert (unit(x_other) - unit(x))[:-1].abs().amax(dim=(1, 2)).min() > 1e-4


@pytest.mark.parametrize("length", [1, 7, 33, 100])
def test_stepping_matches_full_causal_pass(length, kind):
    unit = make_unit(True, kind)
    x = torch.randn(length, 3, 16)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], incremental_state=state) for t in range(length)])
    assert_close(steps, unit(x))


def test_stepping_with_left_padding_matches_full_pass(kind):
    unit = make_unit(True, kind)
    x, mask = torch.randn(11, 2, 16), left_padding(2, 11, pads=3)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], mask[:, t:t + 1], state) for t in range(11)])
    assert_close(steps, unit(x, mask))


def test_reorder_incremental_state_follows_beams(kind):
    unit = make_unit(True, kind)
    x = torch.randn(10, 3, 16)
    order = torch.tensor([2, 2, 0])
    state = {}
    for t in range(6):
        unit(x[t:t + 1], incremental_state=state)
    unit.reorder_incremental_state(state, order)
    reordered = torch.cat([unit(x[t:t + 1, order], incremental_state=state) for t in range(6, 10)])
    assert_close(reordered, unit(x[:, order])[6:])


@pytest.mark.parametrize("causal", [False, True])
def test_padded_frames_do_not_leak(causal, kind):
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero."""
    unit = make_unit(causal, kind)
    assert_padded_frames_do_not_leak(unit)


def test_state_is_constant_in_the_sentence_length(kind):
    unit = make_unit(True, kind)
    state = {}
    shapes = []
    for _ in range(40):
        unit(torch.randn(1, 2, 16), incremental_state=state)
        shapes.append({name: tuple(unit.get_incremental_state(state, name).shape) for name in STATE_NAMES})
    assert all(s == shapes[0] for s in shapes)
    m = 8 if kind == "linear" else 17  # features a head: D, or round(D ln D) = round(8 ln 8)
    assert shapes[0] == {"kv": (2, 2, m, 8), "k_sum": (2, 2, m)}
    assert {slot: tuple(t.shape) for slot, t in unit.initial_state(5, torch.zeros(1)).items()} == \
        {("kv", None): (5, 2, m, 8), ("k_sum", None): (5, 2, m)}


def test_the_encoder_form_refuses_incremental_state():
    with pytest.raises(ValueError, match="only for the causal"):
        make_unit(causal=False)(torch.randn(1, 1, 16), incremental_state={})


def test_builder_reads_the_spec():
    spec = MixerSpec(embed_dim=16, attention_heads=4, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1)
    unit = linear_attention_from_spec(spec)
    assert (unit.embed_dim, unit.num_heads, unit.head_dim, unit.causal) == (16, 4, 4, True)
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(10, 4, causal=False)


# ---------------------------------------------------------------------------------------------- FAVOR+

def test_orthogonal_gaussian_rows():
    w = orthogonal_gaussian(20, 8)  # two full blocks and a part
    for block in (w[:8], w[8:16]):
        directions = block / block.norm(dim=1, keepdim=True)
        assert_close(directions @ directions.T, torch.eye(8), atol=1e-5, rtol=0)
    assert 1.5 < w.norm(dim=1).mean() < 4.5  # chi with 8 degrees of freedom: mean ~2.74


def test_favor_features_estimate_the_softmax_kernel():
    """E[phi(q) . phi(k)] = exp(q . k / sqrt(D)): with many features the estimate is within a few percent."""
    favor = FavorFeatures(8, 65536)
    q, k = 0.5 * torch.randn(32, 8), 0.5 * torch.randn(32, 8)
    estimate = (favor(q, False) * favor(k, False)).sum(-1)
    exact = torch.exp((q * k).sum(-1) / 8 ** 0.5)
    assert ((estimate - exact).abs() / exact).max() < 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_performer_approximates_softmax_attention(causal):
    """With many features FAVOR+ is within 5% of softmax attention (relative to its norm), where elu + 1 features
    with the same weights are not within 10%."""
    performer, linear = make_unit(causal, "performer", features=65536), make_unit(causal, "linear")
    with torch.no_grad():
        performer.qkv.weight.mul_(0.3)  # moderate logits: the regime where the estimate is accurate
        linear.load_state_dict({k: v for k, v in performer.state_dict().items() if "features" not in k})
    x = torch.randn(12, 2, 16)
    q, k, v = (t.view(2, 12, 2, 8).transpose(1, 2) for t in performer.qkv(x.transpose(0, 1)).chunk(3, dim=-1))
    future = torch.ones(12, 12, dtype=torch.bool).triu(1) if causal else None
    softmax = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if future is None else ~future)
    expected = performer.out_proj(softmax.transpose(1, 2).flatten(2)).transpose(0, 1)

    def error(unit):
        return ((unit(x) - expected).norm() / expected.norm()).item()
    assert error(performer) < 0.05 and error(linear) > 0.1  # measured: 0.009 / 0.005 and 0.31 / 0.16


def test_favor_features_match_performer_pytorch():
    """Our phi is performer-pytorch's ``softmax_kernel`` with the same projection, but for its eps = 1e-4 added to
    every feature (0 here) and its stabilizers, factors that cancel in the attention: a query's features are divided
    by exp(max W x') there, by exp(max (W x' - |x'|^2 / 2)) here (a factor exp(|x'|^2 / 2) apart); the keys' by
    exp(max W k') over all keys of the sentence there (which looks ahead in the causal form), not at all here."""
    favor = FavorFeatures(8, 17)
    x = torch.randn(2, 3, 11, 8, dtype=torch.float64)  # [B, H, T, D]
    scaled = x * 8 ** -0.25
    logits = torch.matmul(scaled, favor.projection.t().double())  # W x' [B, H, T, M]
    half_norm = torch.exp(-0.5 * (scaled * scaled).sum(-1, keepdim=True))  # exp(-|x'|^2 / 2) [B, H, T, 1]
    theirs_q = softmax_kernel(x, projection_matrix=favor.projection.double(), is_query=True, eps=0.0)
    assert_close(favor.double()(x, True) * half_norm, theirs_q, atol=1e-12, rtol=1e-12)
    key_max = torch.exp(-logits.amax(dim=(-1, -2), keepdim=True))  # [B, H, 1, 1]
    theirs_k = softmax_kernel(x, projection_matrix=favor.projection.double(), is_query=False, eps=0.0)
    assert_close(favor(x, False) * key_max, theirs_k, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_matches_performer_pytorch_attention(causal, monkeypatch):
    """On our features, performer-pytorch's ``linear_attention`` / ``causal_linear_attention_noncuda`` (prefix sums
    in chunks) give our encoder / blocked causal outputs; both denominators without their eps (the package adds its
    eps to every feature sum, we add ours to the product)."""
    monkeypatch.setattr(linear_attention_module, "EPS", 0.0)
    unit = make_unit(causal, "performer").double()
    unit.block = 4  # several blocks of ours beside the package's chunks
    x = torch.randn(19, 2, 16, dtype=torch.float64)  # [T, B, C]
    q, k, v = (t.view(2, 19, 2, 8) for t in unit.qkv(x.transpose(0, 1)).chunk(3, dim=-1))  # [B, T, H, D]
    phi_q, phi_k = (unit.features(t, is_query).transpose(1, 2) for t, is_query in ((q, True), (k, False)))
    v = v.transpose(1, 2)  # [B, H, T, D]
    heads = causal_linear_attention_noncuda(phi_q, phi_k, v, eps=0.0) if causal else linear_attention(phi_q, phi_k, v)
    expected = unit.out_proj(heads.transpose(1, 2).flatten(2)).transpose(0, 1)  # [T, B, C]
    assert_close(unit(x), expected, atol=1e-10, rtol=1e-10)


def test_query_stabilizer_cancels_and_keys_stay_finite():
    unit = make_unit(causal=True, kind="performer")
    with torch.no_grad():
        unit.qkv.weight.mul_(30.0)  # logits far beyond exp's float32 range without the bounds
    x = torch.randn(20, 2, 16)
    state = {}
    steps = torch.cat([unit(x[t:t + 1], incremental_state=state) for t in range(20)])
    assert torch.isfinite(steps).all()
    assert_close(steps, unit(x), atol=1e-4, rtol=1e-4)


def test_performer_builder_and_its_features_are_kept():
    spec = MixerSpec(embed_dim=16, attention_heads=2, causal=True, kernel_size=3, conv_type="lightweight",
                     conv_heads=2, conv_glu=True, weight_softmax=True, weight_dropout=0.0, attention_dropout=0.1,
                     performer_features=5)
    unit = performer_from_spec(spec)
    assert unit.features.projection.shape == (5, 8) and "features.projection" in unit.state_dict()
    assert performer_from_spec(MixerSpec(**{**spec.__dict__, "performer_features": 0})).features.dim == 17
