"""compress/prune/: torch-pruning to a MAC budget; the pruned model against the original with the same units
masked out, incremental decoding, importance rankings, and the checkpoint of a real `lite train` run (loads in
fairseq, matches, fine-tunes, keeps its dims), with pruned heads, conv heads and GAU widths in its args."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils

from compress import prune as P
from compress.prune import checkpoint as checkpoint_io
from eval.macs import count_params, paper_macs
from lite.checkpoint import load_model, pruned_dims, read_state
from lite.cli import main
from lite.modules import DynamicConv
from tests.conftest import TINY_CONFIG, assert_close, tiny_model

FFN_KINDS = ["decoder_ffn_embed_dim", "encoder_ffn_embed_dim"]
LSRA_KINDS = ["conv_heads", "decoder_attention_heads", *FFN_KINDS, "mixer_attention_heads"]  # sorted, as chosen
# every mechanism: lightweight conv, dynamic conv + GLU, attention + FFN, GAU (+ cross attention)
ARCHS = ["lsra_iwslt_160", "lsra_wmt_200", "transformer_d128", "flash_100m"]


def _inputs(model, batch: int = 3, src_len: int = 8, tgt_len: int = 6, seed: int = 1):
    d = model.decoder.dictionary
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(d.nspecial, len(d), (batch, src_len), generator=g)
    tgt = torch.randint(d.nspecial, len(d), (batch, tgt_len), generator=g)
    prev = torch.cat([torch.full((batch, 1), d.eos()), tgt[:, :-1]], dim=1)
    return src, torch.full((batch,), src_len), prev, tgt


def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*inputs[:3])[0]


def random_batches(model, count: int = 2):
    def batches():
        for i in range(count):
            src, lengths, prev, tgt = _inputs(model, seed=i)
            yield {"net_input": {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev}, "target": tgt}
    return batches


def _all_kinds(model) -> list[str]:
    sites, blocked = P.find_sites(model)
    return [kind for kind in sites if kind not in blocked]


def _mask_dropped(original, pruned_sites, kept: dict[str, dict[str, list[int]]]) -> None:
    """Zero, in ``original``, every weight that reads a dropped unit: the model then computes what the pruned one
    does. Written from the modules' definitions, independently of torch-pruning's groups."""
    with torch.no_grad():
        for kind, per_site in kept.items():
            for site in pruned_sites[kind]:
                module = original.get_submodule(site.name)
                dropped = [u for u in range(_units(module)) if u not in per_site[site.name]]
                size = site.unit_size
                channels = [c for u in dropped for c in range(u * size, (u + 1) * size)]
                if kind.endswith("ffn_embed_dim"):
                    module.fc2.weight[:, channels] = 0
                elif kind.endswith("attention_heads"):
                    module.out_proj.weight[:, channels] = 0
                elif kind == "gau_hidden_dim":
                    module.out_proj.weight[:, channels] = 0
                elif kind == "conv_heads":
                    module.linear2.weight[:, channels] = 0
                    if isinstance(module.conv, DynamicConv):  # the kernels are predicted from every channel
                        module.conv.weight_linear.weight[:, channels] = 0


def _units(module) -> int:
    if hasattr(module, "fc1"):
        return module.fc1.out_features
    if hasattr(module, "q_proj"):
        return module.num_heads
    if hasattr(module, "hidden_dim"):
        return module.hidden_dim
    return module.conv.num_heads


def _assert_steps_match_full_pass(model, inputs) -> None:
    src, lengths, prev, _ = inputs
    with torch.no_grad():
        encoder_out = model.encoder(src, lengths)
        full = model.decoder(prev, encoder_out)[0]  # [B, T, V]
        state: dict = {}
        steps = [model.decoder(prev[:, :t + 1], encoder_out, incremental_state=state)[0] for t in range(prev.size(1))]
    assert_close(torch.cat(steps, dim=1), full)


def _prune_half(model) -> tuple[dict, dict]:
    sites, _ = P.find_sites(model)
    scorer = P.importance_scorer("magnitude")
    kept = {kind: P.prune_kind(sites[kind], max(1, sites[kind][0].units() // 2), scorer) for kind in _all_kinds(model)}
    return sites, kept


# ---------------------------------------------------------------------------------------------- mechanisms

@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_equals_the_original_with_the_dropped_units_masked(arch):
    """Every kind of the model halved at once: torch-pruning's groups must remove exactly the weights of the
    dropped units (q/k/v rows + out_proj columns per head, both GLU halves, U and V rows, the conv heads)."""
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    sites, kept = _prune_half(model)
    assert all(P.dims(sites)[kind] < P.dims(P.find_sites(original)[0])[kind] for kind in kept)
    _mask_dropped(original, sites, kept)
    inputs = _inputs(model)
    assert_close(_logits(model, inputs), _logits(original, inputs))


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_decoder_steps_match_its_full_pass(arch):
    """Pruned heads, conv heads and GAU widths keep incremental decoding (cached keys, conv frames, GAU state)."""
    model = tiny_model(arch)
    _prune_half(model)
    _assert_steps_match_full_pass(model, _inputs(model, batch=2))


def test_magnitude_importance_keeps_the_largest_ffn_units():
    model = tiny_model("transformer_d128")
    ffn = model.encoder.layers[0].ffn  # 16 -> 32 -> 16
    scale = torch.randperm(32).float() + 1  # unit i: every weight of it = scale[i]
    with torch.no_grad():
        ffn.fc1.weight.copy_(scale[:, None].expand(32, 16))
        ffn.fc2.weight.copy_(scale[None, :].expand(16, 32))
    rows = ffn.fc1.weight.detach().clone()
    sites, _ = P.find_sites(model)
    kept = P.prune_kind(sites["encoder_ffn_embed_dim"], 5, P.importance_scorer("magnitude"))
    largest = sorted(scale.argsort(descending=True)[:5].tolist())
    assert kept["encoder.layers.0.ffn"] == largest
    assert_close(ffn.fc1.weight, rows[largest])
    assert ffn.fc2.weight.shape == (16, 5) and model.encoder.layers[1].ffn.fc1.out_features == 5  # uniform


def test_magnitude_importance_keeps_the_largest_heads():
    model = tiny_model("transformer_d128", mixer_attention_heads=None, encoder_attention_heads=4)
    attn = model.encoder.layers[0].mixer.attn  # 4 heads of 4 channels
    scale = torch.tensor([2.0, 7.0, 1.0, 5.0])
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight.copy_(scale.repeat_interleave(4)[:, None].expand(16, 16))
        attn.out_proj.weight.copy_(scale.repeat_interleave(4)[None, :].expand(16, 16))
    sites, _ = P.find_sites(model)
    kept = P.prune_kind(sites["encoder_attention_heads"], 2, P.importance_scorer("magnitude"))
    assert kept["encoder.layers.0.mixer.attn"] == [1, 3]
    assert attn.num_heads == 2 and attn.q_proj.weight.shape == (8, 16) and attn.out_proj.weight.shape == (16, 8)
    assert_close(attn.q_proj.weight, torch.tensor([7.0, 5.0]).repeat_interleave(4)[:, None].expand(8, 16))


def test_taylor_importance_drops_a_large_unit_the_output_ignores():
    """Unit 0 has the largest fc1 row but a zero fc2 column: magnitude keeps it, |w dL/dw| is zero for it."""
    model = tiny_model("transformer_d128")
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.ffn.fc1.weight[0] = 10.0
            layer.ffn.fc2.weight[:, 0] = 0.0
    kept = {}
    for importance in P.IMPORTANCES:
        trial = copy.deepcopy(model)
        sites, _ = P.find_sites(trial)
        if importance == "taylor":
            P.accumulate_gradients(trial, random_batches(trial))
        kept[importance] = P.prune_kind(sites["encoder_ffn_embed_dim"], 16, P.importance_scorer(importance))
    assert 0 in kept["magnitude"]["encoder.layers.0.ffn"]
    assert 0 not in kept["taylor"]["encoder.layers.0.ffn"]


# ---------------------------------------------------------------------------------------------- to a budget

@pytest.mark.parametrize("importance", P.IMPORTANCES)
def test_both_importances_prune_to_the_budget(importance):
    model = tiny_model("lsra_iwslt_160")
    before = paper_macs(model).total
    config = P.PruneConfig(int(0.9 * before), importance=importance, step=0.2)
    result = P.prune_to_budget(model, config, random_batches(model) if importance == "taylor" else None)
    assert result.macs_after == paper_macs(model).total <= config.budget < result.macs_before == before
    assert [s["macs"] for s in result.steps] == sorted((s["macs"] for s in result.steps), reverse=True)
    assert result.kinds == LSRA_KINDS and result.steps[-1]["macs"] == result.macs_after
    assert (result.params_after, result.params_no_embed_after) == count_params(model)
    assert result.params_no_embed_after < result.params_no_embed_before
    for kind in FFN_KINDS:
        assert getattr(model.args, kind) == result.dims_after[kind] < result.dims_before[kind]
    assert all(p.grad is None for p in model.parameters())


def test_an_unreachable_budget_is_refused_before_pruning():
    model = tiny_model("transformer_d128")
    kinds = ["decoder_attention_heads", *FFN_KINDS, "mixer_attention_heads"]  # every kind, by default
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    floor = P.smallest_macs(model, kinds)
    with pytest.raises(P.PruneError, match=rf"out of reach: the smallest reachable is {floor:,} MACs"):
        P.prune_to_budget(model, P.PruneConfig(floor - 1))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in weights.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    result = P.prune_to_budget(model, P.PruneConfig(floor, step=0.5))  # exactly the floor is reachable
    assert result.kinds == kinds and result.macs_after == floor and all(result.dims_after[k] == 1 for k in kinds)


def test_default_kinds_are_those_the_model_args_describe():
    sites, blocked = P.find_sites(tiny_model("lsra_wmt_200"))
    options = P.model_options()
    assert P.choose_kinds(sites, blocked, None, options) == (LSRA_KINDS, {})
    kinds, skipped = P.choose_kinds(sites, blocked, None, options - {"conv_head_dim", "mixer_attention_head_dim"})
    assert kinds == ["decoder_attention_heads", *FFN_KINDS]
    assert "--conv-head-dim" in skipped["conv_heads"]
    assert "--mixer-attention-head-dim" in skipped["mixer_attention_heads"]
    sites, blocked = P.find_sites(tiny_model("flash_100m"))
    assert P.choose_kinds(sites, blocked, None, options) == (["decoder_attention_heads", "gau_hidden_dim"], {})
    # Fastformer takes its heads from the side's attention heads, as cross attention does: neither is pruned
    sites, blocked = P.find_sites(tiny_model("fastformer_100m", mixer_attention_heads=None))
    kinds, skipped = P.choose_kinds(sites, blocked, None, options)
    assert kinds == FFN_KINDS and list(skipped) == ["decoder_attention_heads"]
    assert "(Fastformer) also takes its heads from --decoder-attention-heads" in skipped["decoder_attention_heads"]
    with pytest.raises(P.PruneError, match="--kinds mixer_attention_heads: cannot be pruned: .*Fastformer"):
        P.prune_to_budget(tiny_model("fastformer_100m"), P.PruneConfig(1, kinds=("mixer_attention_heads",)))
    with pytest.raises(P.PruneError, match="--step 1.5"):
        P.PruneConfig(100, step=1.5)


def test_named_kinds_prune_and_the_checkpoint_check_refuses_what_args_cannot_describe(monkeypatch):
    """A pruned kind is saved with its heads and head dim and rebuilds; without the head-dim arg it never would be
    saved unverified."""
    model = tiny_model("transformer_d128")
    original_args = copy.deepcopy(model.args)
    before = paper_macs(model).total
    result = P.prune_to_budget(model, P.PruneConfig(int(0.9 * before), kinds=("mixer_attention_heads",)))
    assert result.pruned_dims == {"mixer_attention_heads": 1, "mixer_attention_head_dim": 8}
    assert model.args.mixer_attention_heads == 1 and model.args.mixer_attention_head_dim == 8
    assert paper_macs(model).total <= int(0.9 * before)
    state = P.pruned_state({"args": None, "cfg": {"model": original_args}, "extra_state": {}}, model, result)
    assert P.verify_state(state, model) <= P.ATOL
    del state["cfg"]["model"].mixer_attention_head_dim  # as if lite_transformer had no such arg
    monkeypatch.setattr(checkpoint_io, "model_options", lambda: set(vars(original_args)) - {"mixer_attention_head_dim"})
    expected = r"args do not describe .*k_proj.weight: weights \(8, 16\).*no --mixer-attention-head-dim arg"
    with pytest.raises(P.PruneError, match=expected):
        P.verify_state(state, model)


# ---------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def trained_copy(trained, tmp_path_factory):
    """The tiny LSRA of configs/models/lsra/tiny.yaml trained with real `lite train` (conftest's ``trained``, on
    conftest's ``workdir`` data), copied: what prune writes goes beside the copy."""
    checkpoint = tmp_path_factory.mktemp("prune") / "checkpoint_best.pt"
    shutil.copy(trained, checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def pruned(trained_copy):
    macs = paper_macs(load_model(trained_copy)[0]).total
    out = trained_copy.parent / "pruned"
    model, report = P.prune_checkpoint(trained_copy, out, P.PruneConfig(int(0.75 * macs), step=0.2))
    return model, report


def test_the_budget_is_met_and_prune_json_says_how(pruned):
    model, report = pruned
    assert report["macs_after"] == paper_macs(model).total <= report["budget"] < report["macs_before"]
    assert report["importance"] == "magnitude" and report["kinds"] == LSRA_KINDS and len(report["steps"]) >= 2
    assert report["params_no_embed_after"] < report["params_no_embed_before"]
    assert report["skipped_kinds"] == {}
    assert all(report["dims_after"][kind] < report["dims_before"][kind] for kind in LSRA_KINDS)  # heads at step 2
    assert sorted(report["finetune_overrides"]) == \
        sorted(f"{arg}={report['dims_after'][arg]}" for kind in LSRA_KINDS for arg in P.kind_args(kind))
    assert json.loads((Path(report["checkpoint"]).parent / P.REPORT_NAME).read_text()) == report
    assert not list(Path(report["checkpoint"]).parent.glob("*.tmp"))


def test_the_checkpoint_args_carry_the_dims_of_its_weights(pruned):
    _, report = pruned
    state = read_state(report["checkpoint"])
    args = state["cfg"]["model"]
    for side in ("encoder", "decoder"):
        hidden = getattr(args, f"{side}_ffn_embed_dim")
        assert hidden == report["dims_after"][f"{side}_ffn_embed_dim"] < report["dims_before"][f"{side}_ffn_embed_dim"]
        for i in range(args.encoder_layers):
            assert state["model"][f"{side}.layers.{i}.ffn.fc1.weight"].shape == (hidden, args.encoder_embed_dim)
            assert state["model"][f"{side}.layers.{i}.ffn.fc2.weight"].shape == (args.encoder_embed_dim, hidden)
    for arg in ("decoder_attention_heads", "decoder_attention_head_dim", "mixer_attention_heads",
                "mixer_attention_head_dim", "conv_heads", "conv_head_dim"):
        assert getattr(args, arg) == report["dims_after"][arg]
    inner = args.decoder_attention_heads * args.decoder_attention_head_dim
    assert state["model"]["decoder.layers.0.cross_attention.k_proj.weight"].shape == (inner, args.encoder_embed_dim)
    assert state["model"]["decoder.layers.0.mixer.conv.linear2.weight"].shape == \
        (args.encoder_embed_dim // 2, args.conv_heads * args.conv_head_dim)
    assert "last_optimizer_state" not in state and state["extra_state"]["previous_training_time"] == 0.0
    # what `lite train --finetune-from` reads back
    assert [f"{k}={v}" for k, v in pruned_dims(state).items()] == report["finetune_overrides"]


def test_the_checkpoint_loads_in_fairseq_and_matches_the_pruned_model(pruned):
    model, report = pruned
    inputs = _inputs(model)
    lite_model, _ = load_model(report["checkpoint"])
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([report["checkpoint"]])
    assert_close(_logits(lite_model, inputs), _logits(model, inputs))
    assert_close(_logits(models[0], inputs), _logits(model, inputs))


def test_finetuning_the_pruned_checkpoint_keeps_its_dims(pruned, workdir, tmp_path):
    _, report = pruned
    data = workdir / "data"
    run = subprocess.run([sys.executable, "-m", "lite.cli", "train", str(TINY_CONFIG), f"data={data}",
                          f"save_dir={tmp_path}", "max_update=2",  # the pruned dims come from the checkpoint
                          "--finetune-from", report["checkpoint"]], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loading pretrained model from" in run.stdout + run.stderr
    state = read_state(tmp_path / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["num_updates"] == 2
    for side in ("encoder", "decoder"):
        hidden = report["dims_after"][f"{side}_ffn_embed_dim"]
        assert getattr(state["cfg"]["model"], f"{side}_ffn_embed_dim") == hidden
        assert state["model"][f"{side}.layers.0.ffn.fc1.weight"].shape[0] == hidden
    for arg in ("decoder_attention_head_dim", "mixer_attention_heads", "mixer_attention_head_dim", "conv_heads",
                "conv_head_dim"):
        assert getattr(state["cfg"]["model"], arg) == report["dims_after"][arg]
    assert "pruned_dims" not in (state.get("extra_state") or {})  # fairseq's own checkpoint: the dims are in its args
    again = subprocess.run([sys.executable, "-m", "lite.cli", "train", str(TINY_CONFIG), f"data={data}",
                            f"save_dir={tmp_path / 'again'}", "max_update=1", "--finetune-from",
                            str(tmp_path / "checkpoint_last.pt")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]  # a fine-tuned pruned checkpoint fine-tunes (or sparsifies)


def test_the_pruned_checkpoint_exports_and_passes_export_validation(pruned, tmp_path):
    from export.exporter import export

    _, report = pruned
    model_dir = export(report["checkpoint"], tmp_path / "onnx")  # raises ExportMismatch past 1e-4
    description = json.loads((model_dir / "model.json").read_text())
    assert description["macs"] == report["macs_after"] < report["macs_before"]  # the pruned model's, not its arch's
    validation = description["validation"]["onnx"]
    assert validation["cases"] > 0 and validation["max_abs_diff"] <= validation["atol"] == 1e-4


def test_cli_prunes_with_taylor_on_the_training_data_and_refuses_bad_budgets(trained_copy, tmp_path, capsys):
    def cli(*argv: str) -> int:
        return main(["compress", "prune", str(trained_copy), "--out", str(tmp_path / "out"), *argv])

    assert cli("--budget", "1k") == 2
    assert "out of reach: the smallest reachable is" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli("--budget", "1100k", "--importance", "taylor", "--taylor-batches", "2", "--step", "0.2", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["importance"] == "taylor" and report["macs_after"] <= 1_100_000
    assert cli("--budget", "1100k") == 2 and "pass --force to replace it" in capsys.readouterr().err
    assert cli("--budget", "1100k", "--kinds", "gau_hidden_dim", "--force") == 2
    assert "--kinds gau_hidden_dim: this model has no such layers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- every width saved

# arch -> (tiny model overrides, the kinds pruned by default); lsra_iwslt_160 is the trained checkpoint itself
SAVED = {
    "lsra_iwslt_160": ({}, LSRA_KINDS),  # LSRA attention, lightweight conv heads, cross attention
    "lsra_wmt_200": ({}, LSRA_KINDS),  # dynamic conv + GLU
    "transformer_d128": (dict(mixer_attention_heads=None, encoder_attention_heads=4, decoder_attention_heads=4),
                         ["decoder_attention_heads", "decoder_ffn_embed_dim", "encoder_attention_heads",
                          "encoder_ffn_embed_dim"]),  # encoder, decoder self- and cross attention
    "flash_100m": ({}, ["decoder_attention_heads", "gau_hidden_dim"]),
}


def _tiny_checkpoint(arch: str, trained: Path, path: Path, **overrides) -> Path:
    """A checkpoint of an untrained tiny ``arch`` on the trained checkpoint's data (its dictionary, training args)."""
    _, task = load_model(trained)
    model = tiny_model(arch, task.source_dictionary, **overrides)
    state = read_state(trained)
    args = state["cfg"]["model"]
    vars(args).update(vars(model.args))
    args.arch = arch
    if hasattr(args, "_name"):
        args._name = arch
    state["model"] = model.state_dict()
    state.pop("last_optimizer_state", None)
    checkpoint_utils.torch_persistent_save(state, str(path))
    return path


@pytest.mark.parametrize("arch", list(SAVED))
def test_pruned_heads_conv_heads_and_gau_width_are_saved_and_load_in_fairseq(arch, trained_copy, tmp_path):
    """Every kind halved in one step (--step 0.5): the checkpoint's args carry heads + head dims, conv heads + conv
    head dim, the GAU width; lite's and fairseq's loaders rebuild it, it reproduces the pruned model and its
    incremental decoding (key/value caches [B, H', t, D], conv frames, GAU state) equals its full causal pass."""
    overrides, kinds = SAVED[arch]
    checkpoint = trained_copy if arch == "lsra_iwslt_160" else \
        _tiny_checkpoint(arch, trained_copy, tmp_path / "tiny.pt", **overrides)
    macs = paper_macs(load_model(checkpoint)[0]).total
    model, report = P.prune_checkpoint(checkpoint, tmp_path / "pruned", P.PruneConfig(int(0.9 * macs), step=0.5))
    assert report["kinds"] == kinds and report["skipped_kinds"] == {} and len(report["steps"]) == 1
    assert all(report["dims_after"][kind] < report["dims_before"][kind] for kind in kinds)
    args = read_state(report["checkpoint"])["cfg"]["model"]
    assert {arg: getattr(args, arg) for kind in kinds for arg in P.kind_args(kind)} == \
        {arg: report["dims_after"][arg] for kind in kinds for arg in P.kind_args(kind)}
    inputs = _inputs(model, batch=2)
    lite_model, _ = load_model(report["checkpoint"])
    fairseq_model = checkpoint_utils.load_model_ensemble_and_task([report["checkpoint"]])[0][0].eval()
    for loaded in (lite_model, fairseq_model):
        assert_close(_logits(loaded, inputs), _logits(model, inputs))
        _assert_steps_match_full_pass(loaded, inputs)
