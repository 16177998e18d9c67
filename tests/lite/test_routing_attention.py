"""Routing attention: fast path (dense attention under the cluster mask) vs the one-query-one-head-at-a-time reference,
stepping (cached keys, values and key clusters) vs the full causal pass, beams, padding, the fallback to a query's own
frame, the centroids: fixed at build time, moved by the moving average in training only, kept in checkpoints, and the
cluster assignment, the k-means step and attention within clusters vs routing-transformer's."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from routing_transformer import KmeansAttention
from routing_transformer.routing_transformer import Kmeans

from lite.modules import CAUSAL_MIXERS, MixerSpec
from lite.modules.routing_attention import STATE_NAMES, RoutingAttention, initial_centroids, routing_attention_from_spec
from tests.conftest import assert_close, left_padding, tiny_model
from tests.lite.mixer_checks import (assert_padded_frames_do_not_leak, assert_reorder_follows_beams,
                                      assert_stepping_matches_full_pass)

CLUSTERS = 3


def make_unit(causal: bool, clusters: int = CLUSTERS, decay: float = 0.999, embed_dim: int = 16,
              heads: int = 4) -> RoutingAttention:
    """A small unit in eval mode with spread-out logits, so that the weights are far from uniform."""
    unit = RoutingAttention(embed_dim, heads, clusters, decay, causal=causal).eval()
    with torch.no_grad():
        for linear in (unit.qkv, unit.out_proj):
            linear.weight.normal_(0.0, 0.5)
            linear.bias.normal_(0.0, 0.1)
    return unit


def spec(**fields) -> MixerSpec:
    return MixerSpec(**{"embed_dim": 16, "attention_heads": 4, "causal": False, "kernel_size": 3,
                        "conv_type": "lightweight", "conv_heads": 2, "conv_glu": True, "weight_softmax": True,
                        "weight_dropout": 0.0, "attention_dropout": 0.0, **fields})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 2, 3, 7, 13, 33])
def test_fast_path_matches_reference(causal, length):
    unit = make_unit(causal)
    x = torch.randn(length, 2, 16)  # [T, B, C]
    assert_close(unit(x), unit.reference_forward(x))
    mask = left_padding(2, length, pads=min(5, length - 1))
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("clusters", [1, 2, 8])
def test_other_cluster_counts_match_reference(causal, clusters):
    unit = make_unit(causal, clusters=clusters)
    x = torch.randn(11, 2, 16)
    mask = left_padding(2, 11, pads=4)
    assert_close(unit(x, mask), unit.reference_forward(x, mask))


def test_one_cluster_is_attention_over_normalized_queries_and_keys():
    """c = 1: every query sees every real key (causal: every earlier one): softmax attention on LN(q), LN(k)."""
    for causal in (False, True):
        unit = make_unit(causal, clusters=1)
        x = torch.randn(9, 1, 16)
        q, k, v = (t.transpose(0, 1) for t in unit._normalized_heads(x[:, 0]))  # [H, T, D]
        logits = q @ k.transpose(-1, -2) / math.sqrt(4)
        if causal:
            logits = logits.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
        want = unit.out_proj((torch.softmax(logits, -1) @ v).transpose(0, 1).flatten(1))
        assert_close(unit(x)[:, 0], want)


def textbook_unit(causal: bool, key_sign: float) -> RoutingAttention:
    """C = 2, 1 head, 2 centroids (1, -1) / sqrt 2 and (-1, 1) / sqrt 2; q = x, k = key_sign x, v = x, W_o = 1. LN of
    a 2-vector is +-(1, -1): a frame's cluster is 0 when x_0 > x_1, else 1, and every logit within a cluster is the
    same, so a query averages the values of the keys it sees."""
    unit = RoutingAttention(2, 1, 2, 0.999, causal=causal).eval()
    eye = torch.eye(2)
    with torch.no_grad():
        unit.qkv.weight.copy_(torch.cat([eye, key_sign * eye, eye]))
        unit.qkv.bias.zero_()
        unit.out_proj.weight.copy_(eye)
        unit.out_proj.bias.zero_()
        unit.centroids.copy_(torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]]) / math.sqrt(2))
    return unit


def test_reference_is_the_textbook_pattern():
    """Frames (2, 0), (0, 1), (3, 1), (0, 5), (1, 0): clusters 0, 1, 0, 1, 0. Encoder: each frame the mean of its
    cluster; causal: of its cluster up to itself."""
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0], [1.0, 0.0]]).view(5, 1, 2)
    a, b = [2.0, 1 / 3], [0.0, 3.0]  # the means of clusters 0 and 1
    expected = {False: [a, b, a, b, a], True: [[2.0, 0.0], [0.0, 1.0], [2.5, 0.5], b, a]}
    for causal in (False, True):
        unit = textbook_unit(causal, key_sign=1.0)
        want = torch.tensor(expected[causal]).view(5, 1, 2)
        assert_close(unit.reference_forward(x), want, atol=1e-4, rtol=1e-4)  # LN's epsilon: weights ~1e-6 off even
        assert_close(unit(x), want, atol=1e-4, rtol=1e-4)


def test_a_query_without_keys_in_its_cluster_sees_its_own_frame():
    """k = -x puts each frame's key in the other cluster than its query. Causal: frame 0's query (cluster 0) has no
    key of cluster 0 before it, so it returns its own value; frame 1's (cluster 1) sees key 0 (cluster 1); frame 2's
    sees key 1. A sentence whose frames all fall in cluster 0 has no key for any query: each returns itself."""
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]).view(3, 1, 2)
    want = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]]).view(3, 1, 2)
    unit = textbook_unit(causal=True, key_sign=-1.0)
    assert_close(unit(x), want, atol=1e-4, rtol=1e-4)
    assert_close(unit.reference_forward(x), want, atol=1e-4, rtol=1e-4)
    state = {}
    assert_close(torch.cat([unit(x[t:t + 1], incremental_state=state) for t in range(3)]), want, atol=1e-4, rtol=1e-4)
    same = torch.tensor([[2.0, 0.0], [3.0, 1.0], [5.0, 1.0]]).view(3, 1, 2)
    for causal in (False, True):
        unit = textbook_unit(causal, key_sign=-1.0)
        assert_close(unit(same), same, atol=1e-4, rtol=1e-4)
        assert_close(unit.reference_forward(same), same, atol=1e-4, rtol=1e-4)


def test_the_pattern_is_sparse_not_vacuous():
    """With random weights the 3 centroids split a head's queries and keys: some query-key pairs are masked, and the
    output differs from attention over all keys."""
    unit = make_unit(causal=False)
    x = torch.randn(33, 1, 16)
    q, k, _ = (t.transpose(1, 2) for t in unit._normalized_heads(x.transpose(0, 1)))  # [1, H, T, D]
    same = unit.route(q).unsqueeze(-1) == unit.route(k).unsqueeze(-2)  # [1, H, T, T]
    assert 0.1 < same.float().mean() < 0.9
    dense = make_unit(causal=False, clusters=1)
    dense.load_state_dict({**unit.state_dict(), "centroids": dense.centroids})
    assert (unit(x) - dense(x)).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_changes_nothing(causal):
    """Routing is by content: a left-padded sentence gives the outputs it gives alone."""
    unit = make_unit(causal)
    x = torch.randn(12, 2, 16)
    mask = left_padding(2, 12, pads=5)
    assert_close(unit(x, mask)[5:, 1], unit(x[5:, 1:2])[:, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_padded_frames_do_not_leak(causal):
    """Changing what sits at padded positions (left and right) changes nothing at real positions; pads give zero."""
    unit = make_unit(causal)
    x, mask, y = assert_padded_frames_do_not_leak(unit)
    assert_close(y, unit.reference_forward(x, mask))


@pytest.mark.parametrize("length", [1, 2, 3, 7, 10, 33])
def test_stepping_matches_full_causal_pass(length):
    assert_stepping_matches_full_pass(make_unit(causal=True), length)


@pytest.mark.parametrize("length", [2, 9, 23])
def test_stepping_with_left_padding_matches_full_pass(length):
    assert_stepping_matches_full_pass(make_unit(causal=True), length, pads=min(5, length - 1))


def test_reorder_incremental_state_follows_beams():
    assert_reorder_follows_beams(make_unit(causal=True))


def test_state_is_the_cached_frames_and_their_clusters():
    """O(t): the keys/values of every frame so far and each key's cluster, -1 at a pad."""
    unit = make_unit(causal=True)
    state = {}
    for t in range(1, 8):
        unit(torch.randn(1, 2, 16), torch.tensor([[t < 3], [False]]), incremental_state=state)
        shapes = tuple(tuple(unit.get_incremental_state(state, name).shape) for name in STATE_NAMES)
        assert shapes == ((2, 4, t, 4), (2, 4, t, 4), (2, 4, t))
    clusters = unit.get_incremental_state(state, "key_cluster")
    assert (clusters[0, :, :2] == -1).all() and (clusters[0, :, 2:] >= 0).all() and (clusters[1] >= 0).all()
    assert clusters.max() < CLUSTERS
    initial = unit.initial_state(5, torch.zeros(1))
    assert {slot: tuple(t.shape) for slot, t in initial.items()} == \
        {("key", None): (5, 4, 0, 4), ("value", None): (5, 4, 0, 4), ("key_cluster", None): (5, 4, 0)}


# ------------------------------------------------------------------------------------ centroids

def test_the_initial_centroids_are_fixed_unit_vectors():
    first, second = make_unit(causal=False), make_unit(causal=True)
    assert torch.equal(first.centroids, second.centroids)
    assert torch.equal(first.centroids, initial_centroids(4, CLUSTERS, 4))
    assert first.centroids.shape == (4, CLUSTERS, 4)
    assert_close(first.centroids.norm(dim=-1), torch.ones(4, CLUSTERS))
    assert "centroids" in first.state_dict()


def test_centroids_move_in_training_and_are_frozen_in_eval():
    unit = make_unit(causal=True)
    x, mask = torch.randn(10, 3, 16), left_padding(3, 10, pads=4)
    before = unit.centroids.clone()
    unit(x, mask)  # eval: full pass
    state = {}
    for t in range(10):  # eval: decoding steps
        unit(x[t:t + 1], mask[:, t:t + 1], state)
    assert torch.equal(unit.centroids, before)  # bitwise
    unit.train()
    unit(x, mask)
    moved = unit.centroids.clone()
    assert (moved - before).abs().max() > 1e-5
    assert_close(moved.norm(dim=-1), torch.ones(4, CLUSTERS))
    unit(x, mask)
    assert not torch.equal(unit.centroids, moved)  # every training pass moves them
    unit.eval()
    frozen = unit.centroids.clone()
    unit(x, mask)
    assert torch.equal(unit.centroids, frozen)


def test_the_update_is_the_moving_average_of_the_assigned_queries_and_keys():
    """lambda = 0.6: mu <- normalize(0.6 mu + 0.2 mean(assigned unit queries) + 0.2 mean(assigned unit keys)), the
    means over real frames only (a mean with nothing assigned is mu itself), clusters by the old centroids; counted
    here with loops."""
    unit = make_unit(causal=False, decay=0.6)
    x, mask = torch.randn(9, 2, 16), left_padding(2, 9, pads=3)
    old = unit.centroids.clone()
    q, k, _ = unit._normalized_heads(x.transpose(0, 1))  # [B, T, H, D]
    want = old.clone()
    for h in range(4):
        for m in range(CLUSTERS):
            means = []
            for vectors in (q, k):
                units = [F.normalize(vectors[b, t, h], dim=0) for b in range(2) for t in range(9) if not mask[b, t]]
                assigned = [u for u in units if int(torch.argmin((old[h] - u).norm(dim=-1))) == m]
                means.append(torch.stack(assigned).mean(0) if assigned else old[h, m])
            want[h, m] = F.normalize(0.6 * old[h, m] + 0.2 * means[0] + 0.2 * means[1], dim=0)
    unit.train()
    unit(x, mask)
    assert_close(unit.centroids, want.detach())


def test_pads_do_not_move_the_centroids():
    first = make_unit(causal=False).train()
    second = copy.deepcopy(first)
    x, mask = torch.randn(8, 2, 16), left_padding(2, 8, pads=3)
    other = x.clone()
    other[:3, 1] = 1e3 * torch.randn(3, 16)
    first(x, mask)
    second(other, mask)
    assert_close(first.centroids, second.centroids)


def test_training_backpropagates_through_the_routed_pass():
    """The centroids change in place after routing: the backward pass must not need their old value."""
    unit = make_unit(causal=True).train()
    x = torch.randn(7, 2, 16, requires_grad=True)
    unit(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and unit.qkv.weight.grad.abs().sum() > 0


def test_centroids_survive_a_checkpoint(tmp_path):
    """A model trained a few passes (forward only: the centroids move without an optimizer) is saved and loaded into
    a fresh build: every layer's centroids come back bitwise, and the two translate the same."""
    model = tiny_model("routing_100m").train()
    tokens = torch.randint(4, 40, (3, 6))
    lengths = torch.full((3,), 6)
    for _ in range(3):
        model(tokens, lengths, tokens)
    model.eval()
    keys = [key for key in model.state_dict() if key.endswith("mixer.centroids")]
    assert len(keys) == 4  # 2 encoder + 2 decoder layers
    fresh = tiny_model("routing_100m")
    assert all(not torch.equal(model.state_dict()[key], fresh.state_dict()[key]) for key in keys)
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pt")
    fresh.load_state_dict(torch.load(tmp_path / "checkpoint.pt")["model"])
    assert all(torch.equal(model.state_dict()[key], fresh.state_dict()[key]) for key in keys)
    assert torch.equal(model(tokens, lengths, tokens)[0], fresh(tokens, lengths, tokens)[0])


# ------------------------------------------------------------------------------------ vs routing-transformer

def package_kmeans(unit: RoutingAttention) -> Kmeans:
    """routing-transformer's ``Kmeans`` with our centroids as its means (marked initialized: no k-means init of its
    own) and our decay."""
    kmeans = Kmeans(unit.num_heads, unit.head_dim, unit.clusters, ema_decay=unit.decay)
    kmeans.means.copy_(unit.centroids)
    kmeans.initted.fill_(True)
    return kmeans


def test_cluster_assignment_matches_routing_transformer():
    """Each query's and key's cluster is the one routing-transformer's ``Kmeans`` (lucidrains) assigns with our
    centroids as its means: the largest cosine (the package normalizes the vectors; ours leaves |x| out of the
    argmax), on the queries and keys concatenated as its ``KmeansAttention`` passes them."""
    unit = make_unit(causal=False)
    x = torch.randn(13, 2, 16)  # [T, B, C]
    q, k, _ = (t.transpose(1, 2) for t in unit._normalized_heads(x.transpose(0, 1)))  # [B, H, T, D]
    similarity, _ = package_kmeans(unit)(torch.cat([q, k], dim=2))  # [B, H, 2 T, c]
    assert torch.equal(torch.cat([unit.route(q), unit.route(k)], dim=2), similarity.argmax(-1))


@pytest.mark.parametrize("clusters,length", [(3, 13), (8, 3)])  # 8 centroids, 6 vectors a head: some keep theirs
def test_kmeans_step_matches_routing_transformer(clusters, length):
    """With lambda = 0 and keys equal to the queries (W_k, b_k = W_q, b_q), a training pass moves our centroids as
    routing-transformer's ``Kmeans`` moves its means on the same queries and keys (``update_means=True``, then
    ``update()``): one spherical k-means step, each centroid the normalized mean of the unit vectors assigned to it,
    a centroid with none assigned kept. The moving averages differ otherwise: the package moves a mean by
    lambda mu + (1 - lambda) normalize(sum of the queries and keys assigned), off the unit sphere, ours to
    normalize(lambda mu + (1 - lambda) (mean_q + mean_k) / 2), a unit vector; they coincide when lambda = 0 and each
    cluster holds as many queries as keys (k = q). The package also averages the new means of the passes between two
    calls of ``update()``; ours moves every training pass. No padding: the package's k-means counts every frame."""
    unit = make_unit(causal=False, clusters=clusters, decay=0.0)
    with torch.no_grad():
        unit.qkv.weight[16:32].copy_(unit.qkv.weight[:16])  # W_k = W_q: rows q, k, v of 16 each
        unit.qkv.bias[16:32].copy_(unit.qkv.bias[:16])
    x = torch.randn(length, 2, 16)  # [T, B, C]
    q, k, _ = (t.transpose(1, 2) for t in unit._normalized_heads(x.transpose(0, 1)))  # [B, H, T, D]
    kmeans = package_kmeans(unit)
    kmeans(torch.cat([q, k], dim=2), update_means=True)
    kmeans.update()
    unit.train()
    unit(x)
    assert_close(unit.centroids, kmeans.means)


@pytest.mark.parametrize("length", [8, 20])
def test_attention_within_clusters_matches_routing_transformer(length):
    """Where the package's windows are our clusters, the encoder is routing-transformer's ``KmeansAttention``
    (lucidrains; no memory keys) on our LN(q), LN(k), v, then our out_proj: a softmax of q . k / sqrt(D) over the keys
    of the query's cluster. Its c windows take the w = T / c queries and the w keys nearest each mean, ours each
    vector's nearest centroid; they are the same sets when each cluster holds w queries and w keys, its nearest:
    here c = 2 antipodal centroids (mu, -mu) a head, no bias on q and k, and the input (x, -x), so that every q and
    k has an opposite twin and each cluster takes one of each pair. Bridged: the package's output is a scatter mean
    whose count has 1e-5 added, so a query in one window gets ours / (1 + 1e-5): multiplied back, and compared
    without a relative tolerance (a relative 1e-5 would hide that factor). Not compared: clusters of other sizes
    (the package's windows then drop members or take others', and a query in no window gets zero), padding (pads
    take window places there) and the causal form (the package adds a learned memory key a cluster, or with shared
    q, k hides a query's own key; ours falls back to the query's own frame)."""
    unit = make_unit(causal=False, clusters=2)
    with torch.no_grad():
        unit.qkv.bias[:32].zero_()  # b_q = b_k = 0: q(-x) = -q(x)
        mu = F.normalize(torch.randn(4, 1, 4), dim=-1)  # [H, 1, D]
        unit.centroids.copy_(torch.cat([mu, -mu], dim=1))
    half = torch.randn(length // 2, 2, 16)
    x = torch.cat([half, -half])  # [T, B, C]
    q, k, v = (t.transpose(1, 2) for t in unit._normalized_heads(x.transpose(0, 1)))  # [B, H, T, D]
    theirs = KmeansAttention(2, length // 2, 4, 4).eval()  # c, w, H, D
    theirs.kmeans = package_kmeans(unit)
    out, _ = theirs(q, k, v)  # [B, H, T, D]
    expected = unit.out_proj(out.transpose(1, 2).flatten(2) * (1 + 1e-5))  # [B, T, C]
    assert_close(unit(x), expected.transpose(0, 1), rtol=0)


# ------------------------------------------------------------------------------------ building

def test_the_encoder_form_refuses_incremental_state():
    with pytest.raises(ValueError, match="only for the causal"):
        make_unit(causal=False)(torch.randn(1, 1, 16), incremental_state={})


def test_builder_reads_the_spec():
    unit = routing_attention_from_spec(spec(causal=True, attention_dropout=0.1, routing_clusters=5,
                                            routing_decay=0.9))
    assert (unit.num_heads, unit.clusters, unit.decay, unit.causal, unit.dropout) == (4, 5, 0.9, True, 0.1)
    assert unit.centroids.shape == (4, 5, 4)
    assert (spec().routing_clusters, spec().routing_decay) == (4, 0.999)
    assert "routing" in CAUSAL_MIXERS


@pytest.mark.parametrize("clusters,decay,message", [
    (0, 0.999, "routing attention: --routing-clusters must be >= 1, got 0"),
    (4, 1.0, r"routing attention: --routing-decay must be in \[0, 1\), got 1.0"),
    (4, -0.1, r"routing attention: --routing-decay must be in \[0, 1\), got -0.1")])
def test_bad_options_are_refused_in_one_line(clusters, decay, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        RoutingAttention(16, 4, clusters, decay, causal=False)
    with pytest.raises(ValueError, match=f"^{message}$"):
        tiny_model("routing_100m", routing_clusters=clusters, routing_decay=decay)
    with pytest.raises(ValueError, match="divisible"):
        RoutingAttention(10, 4, 2, 0.9, causal=False)


def test_the_preset_routes_in_encoder_and_decoder():
    model = tiny_model("routing_100m")
    args = model.args
    assert (args.encoder_mixer, args.decoder_mixer, args.routing_clusters, args.routing_decay) == \
        ("routing", "routing", 4, 0.999)
    assert isinstance(model.decoder.layers[0].mixer, RoutingAttention) and model.decoder.layers[0].mixer.causal
    assert isinstance(model.encoder.layers[0].mixer, RoutingAttention) and not model.encoder.layers[0].mixer.causal
