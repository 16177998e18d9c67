"""lite pipeline end to end on a tiny config: every stage runs once, the summary equals an independent recount,
a second run skips everything, a changed or failed stage reruns from there, and the run dir is locked."""
import fcntl
import json

import pytest
import yaml
from sacrebleu.metrics import BLEU

from lite.machine import describe
from lite.pipeline import PipelineError, load_pipeline, run_pipeline
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "models" / "lsra" / "tiny.yaml")


def _config(tmp_path, name="tiny", budget="0.9M", **extra):
    config = {"name": name,
              "data": {"source": "embedded", "vocab_size": 400, "test_split": "test"},
              "models": {
                  "lsra": {"config": TINY, "overrides": {"max_update": 30},
                           "prune": {"budget": budget, "finetune_overrides": {"max_update": 40}}},
                  "transformer": {"config": TINY, "overrides": {"arch": "transformer_d128", "max_update": 30,
                                                                "mixer_attention_heads": None,
                                                                "save_interval_updates": 10},
                                  "eval_at_updates": [20, 40]}},  # 40: past the end of its training
              "bench": {"sentences": 4, "batch": 2}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_pipeline(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = _config(tmp)
    return config, tmp / "run", run_pipeline(config, tmp / "run")


def test_every_stage_runs_and_is_recorded(run):
    config, run_dir, ran = run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert ran == list(manifest["stages"]) and ran[0] == "data" and ran[-2:] == ["summary", "report"]
    assert {"lsra/prune", "lsra/finetune", "lsra/quantize", "transformer/quantize", "bench"} <= set(ran)
    for name, entry in manifest["stages"].items():
        assert entry["status"] == "done" and entry["outputs"] and entry["command"] and entry["cpu_seconds"] >= 0
        assert entry["machine"] == describe()  # what its CPU seconds bought depends on the CPU
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]


def test_summary_equals_an_independent_recount(run):
    _, run_dir, _ = run
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    references = (run_dir / "data" / "raw" / "test.en").read_text(encoding="utf-8").split("\n")[:-1]
    for stage in ("fp32", "pruned", "finetuned", "int8"):
        hypotheses = (run_dir / "lsra" / "eval" / stage / "test.hyp.en").read_text(encoding="utf-8").split("\n")[:-1]
        bleu = round(BLEU().corpus_score(hypotheses, [references]).score, 2)
        assert summary["stages"][f"lsra/{stage}"]["bleu"] == bleu
    at_20 = (run_dir / "transformer" / "eval" / "fp32_at_20" / "test.hyp.en").read_text(encoding="utf-8")
    assert summary["stages"]["transformer/fp32"]["bleu_at_updates"] == {  # 40: never reached, left out
        "20": round(BLEU().corpus_score(at_20.split("\n")[:-1], [references]).score, 2)}
    assert "bleu_at_updates" not in summary["stages"]["transformer/int8"]  # the training's, not the int8 model's
    int8 = run_dir / "lsra" / "onnx" / "int8"
    assert summary["stages"]["lsra/int8"]["bytes"] == sum(p.stat().st_size for p in int8.rglob("*") if p.is_file())
    assert summary["stages"]["lsra/pruned"]["macs"] <= 0.9e6 < summary["stages"]["lsra/fp32"]["macs"]
    backends = summary["backends"]
    assert {n.split(":")[0] for n in backends} >= {"ct2-int8", "ct2-float32"}  # the Transformer on CTranslate2
    assert len(backends) == 8  # torch, onnx fp32/pruned, onnx int8 of each model + ct2 fp32/int8: no name shared
    assert all(b["latency_ms_p50"] > 0 and b["tokens_per_s"] > 0 for b in backends.values())


def test_a_second_run_skips_everything_and_a_change_reruns_from_there(run, tmp_path):
    config, run_dir, _ = run
    assert run_pipeline(config, run_dir) == []
    changed = _config(tmp_path, bench={"sentences": 3, "batch": 2, "shortlist": {"per_source": 3, "frequent": 10},
                                       "ort_search": True})
    assert run_pipeline(changed, run_dir) == ["shortlist", "bench", "summary", "report"]
    backends = json.loads((run_dir / "report" / "summary.json").read_text())["backends"]
    shortlisted = {n for n in backends if "+shortlist" in n}
    searched = {n for n in backends if "+ort-search" in n}
    assert len(backends) == 16 and len(shortlisted) == 6  # each onnx and ct2 target again, with the map
    assert {n.replace("+shortlist", "") for n in shortlisted} < set(backends)
    assert searched == {"onnx:transformer/fp32+ort-search@1", "onnx:transformer/int8+ort-search@1"}  # not the LSRA
    assert all(backends[n]["latency_ms_p50"] > 0 for n in searched)
    assert "--ort-search" in json.loads((run_dir / "bench.json").read_text())["command"]
    assert (run_dir / "shortlist.txt").read_text(encoding="utf-8").startswith("\t")


def test_a_failed_stage_is_recorded_and_the_rerun_continues_there(tmp_path, run):
    _, done, _ = run
    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(done, run_dir, ignore=shutil.ignore_patterns(".lock"))
    impossible = _config(tmp_path, budget="1")
    with pytest.raises(Exception, match="out of reach"):
        run_pipeline(impossible, run_dir)
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["lsra/prune"]
    assert entry["status"] == "failed" and "out of reach" in entry["error"]
    ran = run_pipeline(_config(tmp_path), run_dir)
    assert "lsra/train" not in ran and ran[0] == "lsra/prune"


def test_bad_configs_and_a_locked_run_dir_are_refused(tmp_path, run):
    config, run_dir, _ = run
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "models": {"m": {"config": TINY, "epochs": 3}}}))
    with pytest.raises(PipelineError, match="unknown key.*epochs.*valid: config, overrides"):
        load_pipeline(path)
    path.write_text(yaml.safe_dump({"name": "x", "models": {"m": {"config": TINY}},
                                    "bench": {"shortlist": {"per_sorce": 3}}}))
    with pytest.raises(PipelineError, match="bench.shortlist: unknown key.*per_sorce.*valid: per_source, frequent"):
        load_pipeline(path)
    for model, says in (({"config": TINY, "overrides": {"save_interval_updates": 200}, "eval_at_updates": [2000, 2100]},
                         r"no checkpoint is kept at 2100 updates \(save_interval_updates is 200"),
                        ({"config": TINY, "eval_at_updates": [2000]},
                         r"no checkpoint is kept at 2000 updates \(save_interval_updates is not set"),
                        ({"config": TINY, "overrides": {"save_interval_updates": 200}, "eval_at_updates": 2000},
                         "a list of update counts")):
        path.write_text(yaml.safe_dump({"name": "x", "models": {"m": model}}))
        with pytest.raises(PipelineError, match=f"models.m.eval_at_updates: {says}"):
            load_pipeline(path)
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PipelineError, match="in use by another"):
            run_pipeline(config, run_dir)


def test_a_subset_of_the_models_runs_their_stages_only(tmp_path):
    from lite.pipeline import plan, select_models

    config = select_models(_config(tmp_path), ["transformer"])
    names = [stage.name for stage in plan(config, tmp_path / "run")]
    assert "transformer/train" in names and not any(n.startswith("lsra/") for n in names)
    with pytest.raises(PipelineError, match=r"no model gpt; its models: lsra, transformer"):
        select_models(_config(tmp_path), ["lsra", "gpt"])
