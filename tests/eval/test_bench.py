"""lite bench on the tiny trained LSRA: torch, ONNX fp32 and a ct2 target it cannot run, in one run; every
figure of output and size checked against an independent recomputation."""
import json

import pytest
from sacrebleu.metrics import BLEU

from eval.bench import BenchConfig, Target, bench, markdown
from lite.cli import main
from lite.machine import describe


@pytest.fixture(scope="module")
def document(trained, workdir, model_dir):
    raw = workdir / "data" / "raw"
    sources = (raw / "test.de").read_text(encoding="utf-8").split("\n")[:-1]
    references = (raw / "test.en").read_text(encoding="utf-8").split("\n")[:-1]
    targets = [Target("torch", str(trained)), Target("onnx", str(model_dir)), Target("ct2", str(trained), "int8")]
    config = BenchConfig(sentences=12, threads=(1,), repeat=2, warmup=2, batch=4)
    return bench(targets, sources, references, config), references[:12], model_dir


def test_every_backend_is_measured_and_ct2_refuses_lsra_in_one_line(document):
    doc, _, _ = document
    torch_run, onnx_run, ct2_run = doc["results"]
    for run in (torch_run, onnx_run):
        f = run["figures"]
        assert run["error"] is None and f["sentences"] == 12
        assert 0 < f["latency_ms_p50"] <= f["latency_ms_p90"] and 0 < f["greedy_ms_p50"] <= f["greedy_ms_p90"]
        assert f["tokens_per_s"] > 0 and f["load_s"] > 0
        assert f["peak_rss_mb"] >= f["peak_rss_batch1_mb"] >= f["rss_loaded_mb"] > f["rss_libs_mb"] > 0
        assert run["repeats"]["latency_ms_p50"]["min"] <= f["latency_ms_p50"] <= run["repeats"]["latency_ms_p50"]["max"]
    assert "cannot be converted to CTranslate2" in ct2_run["error"] and "\n" not in ct2_run["error"]
    assert "cannot be converted" in markdown(doc)
    assert doc["machine"] == describe()  # the CPU the times are of


def test_output_figures_match_an_independent_recount(document, trained):
    doc, references, model_dir = document
    torch_run, onnx_run, _ = doc["results"]
    for run in (torch_run, onnx_run):
        assert len(run["hypotheses"]) == 12
        assert run["figures"]["bleu"] == round(BLEU().corpus_score(run["hypotheses"], [references]).score, 2)
        assert run["figures"]["same_as_first"] == sum(
            a == b for a, b in zip(run["hypotheses"], torch_run["hypotheses"]))
    assert onnx_run["figures"]["same_as_first"] >= 11  # ONNX == fairseq (tested in full in tests/export)
    assert torch_run["figures"]["bytes"] == trained.stat().st_size
    assert onnx_run["figures"]["bytes"] == sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())


def test_the_table_names_the_machine():
    doc = {"results": [], "machine": {"cpu": "AMD EPYC 7B13", "isa": "avx2", "cores": 2}}
    assert markdown(doc).endswith("\nOn AMD EPYC 7B13 (avx2), 2 cores.")
    doc["machine"]["isa"] = ""
    assert markdown(doc).endswith("(no vector extension named), 2 cores.")
    assert "cores" not in markdown({"results": [], "machine": {}})  # a JSON from before machines were described


def test_repeats_are_rounds_over_all_targets_every_other_one_reversed(monkeypatch):
    """The order of the worker runs (their measurement is tested above, on real targets): a drift of the machine
    during the run falls on every target alike, and a target that failed is not run again."""
    import eval.bench

    order, latency = [], {"a": [3.0, 1.0, 2.0], "b": [5.0, 4.0, 6.0]}

    def worker(target, lines, config, threads):
        order.append(target.label)
        if target.label == "broken":
            return {"error": "worker exited with 1: no model"}
        ms = latency[target.label][sum(o == target.label for o in order) - 1]
        return {**{k: ms for k in eval.bench.TIMED}, "bytes": 1, "outputs": ["x"], "latency_by_length": [[1, ms]]}

    monkeypatch.setattr(eval.bench, "_run_worker", worker)
    targets = [Target("onnx", p, label=p) for p in ("a", "broken", "b")]
    doc = bench(targets, ["ein Satz"], config=BenchConfig(repeat=3))
    assert order == ["a", "broken", "b", "b", "a", "a", "b"]
    a, broken, b = doc["results"]
    assert a["figures"]["latency_ms_p50"] == 2.0 and a["repeats"]["latency_ms_p50"] == {"min": 1.0, "median": 2.0,
                                                                                         "max": 3.0}
    assert b["figures"]["latency_ms_p50"] == 5.0 and b["figures"]["same_as_first"] == 1
    assert broken["error"] == "worker exited with 1: no model" and not broken["figures"]


def test_cli_writes_the_json_and_prints_the_table(trained, workdir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    source = workdir / "data" / "raw" / "test.de"
    assert main(["bench", "--source", str(source), "--checkpoint", str(trained), "--sentences", "3",
                 "--warmup", "0", "--batch", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["figures"]["sentences"] == 3
    assert "| torch:" in capsys.readouterr().out


def test_shortlist_measures_each_onnx_target_again_with_it(model_dir, workdir, tmp_path):
    from export.runtime import Translator
    from lite.shortlist import build_shortlist

    vmap = tmp_path / "vmap.txt"
    build_shortlist(workdir / "data", vmap, per_source=2, frequent=5)
    out, source = tmp_path / "bench.json", workdir / "data" / "raw" / "test.de"
    assert main(["bench", "--source", str(source), "--model", str(model_dir), "--shortlist", str(vmap),
                 "--sentences", "4", "--warmup", "0", "--batch", "2", "--out", str(out)]) == 0
    plain, shortlisted = json.loads(out.read_text())["results"]
    assert (plain["target"], shortlisted["target"]) == (f"onnx:{model_dir.name}", f"onnx:{model_dir.name}+shortlist")
    sources = source.read_text(encoding="utf-8").split("\n")[:4]
    translator = Translator(model_dir, shortlist=vmap, batch_size=1)
    assert shortlisted["hypotheses"] == [translator.translate([line])[0] for line in sources]


def test_targets_whose_names_clash_are_told_apart_by_their_paths():
    from eval.bench import distinct_labels

    targets = [Target("onnx", "runs/export/d128/int8"), Target("onnx", "runs/export/lsra_100m/int8"),
               Target("onnx", "runs/x/fp32"), Target("ct2", "runs/a/checkpoints/best.pt", "int8"),
               Target("ct2", "runs/b/checkpoints/best.pt", "int8"), Target("ct2", "runs/b/checkpoints/best.pt", "float32"),
               Target("onnx", "runs/y/int8", label="mine")]
    assert [t.name for t in distinct_labels(targets)] == [
        "onnx:d128/int8", "onnx:lsra_100m/int8", "onnx:fp32", "ct2-int8:a/checkpoints/best.pt",
        "ct2-int8:b/checkpoints/best.pt", "ct2-float32:best.pt", "onnx:mine"]
