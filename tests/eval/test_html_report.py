"""``lite report`` on two hand-written runs: the Pareto frontier, the tables, the plots' JSON and the offline HTML
checked against numbers worked out by hand (in the comments), never against the code under test."""
import argparse
import base64
import json
import re
from pathlib import Path

import pytest

from eval.report import ReportError, report
from lite.cli import report as report_cli

M = 1_000_000


def stage(bleu, macs, bytes_, family, budget, arch, params=2 * M, params_no_embed=M):
    return {"bleu": bleu, "macs": macs, "params": params, "params_no_embed": params_no_embed, "bytes": bytes_,
            "arch": arch, "family": family, "budget": budget}


def result(target, backend, threads, p50, p90, tokens, rss, bytes_, bleu, by_length, error=None):
    figures = {} if error else {"latency_ms_p50": p50, "latency_ms_p90": p90, "greedy_ms_p50": p50 / 2,
                                "tokens_per_s": tokens, "peak_rss_mb": rss, "bytes": bytes_, "bleu": bleu,
                                "same_as_first": 5, "sentences": 5}
    return {"target": target, "backend": backend, "threads": threads, "figures": figures, "repeats": {},
            "hypotheses": [], "latency_by_length": by_length, "error": error}


TORCH_A = [[3, 100.0], [4, 120.0], [7, 190.0], [9, 210.0], [12, 300.0]]
ONNX_A = [[3, 30.0], [4, 40.0], [7, 60.0], [9, 70.0], [12, 100.0]]
ONNX_B = [[2, 15.0], [6, 25.0]]
SUMMARY_A = {
    "name": "a", "command": "lite pipeline configs/pipelines/a.yaml",
    "stages": {"fp32": stage(30.0, 100 * M, 8 * M, "lsra", "100M", "lsra_100m"),
               "pruned": stage(28.5, 60 * M, 4_800_000, "lsra", "100M", "lsra_100m"),
               "finetuned": stage(29.5, 60 * M, 4_800_000, "lsra", "100M", "lsra_100m"),
               "int8": stage(29.25, 60 * M, 1_300_000, "lsra", "100M", "lsra_100m")},
    "backends": {  # torch is in bench.json too (shown from there: 180 ms, not 999); onnx:int8 is only here
        "torch:checkpoint_best.pt": {"latency_ms_p50": 999.0, "latency_ms_p90": 999.0, "tokens_per_s": 1.0,
                                     "peak_rss_mb": 1.0, "threads": 1, "bleu": 1.0, "bytes": 1},
        "onnx:int8": {"latency_ms_p50": 45.0, "latency_ms_p90": 50.0, "tokens_per_s": 200.0, "peak_rss_mb": 150.0,
                      "threads": 1, "bleu": 29.25, "bytes": 2_300_000}}}
BENCH_A = {"config": {"beam": 4}, "targets": [], "machine": {"cpus": 2},  # no "command": not recorded
           "results": [result("torch:checkpoint_best.pt", "torch", 1, 180.0, 200.0, 50.0, 400.0, 8 * M, 30.0, TORCH_A),
                       result("onnx:fp32", "onnx", 1, 60.0, 70.0, 150.0, 200.0, 8_100_000, 30.0, ONNX_A),
                       result("onnx:fp32", "onnx", 2, 40.0, 45.0, 250.0, 210.0, 8_100_000, 30.0, [])]}
SUMMARY_B = {
    "name": "b", "command": "lite pipeline configs/pipelines/b.yaml",
    "stages": {"small": stage(26.0, 40 * M, 3 * M, "transformer", "100M", "transformer_d128"),
               "fp32": stage(33.0, 400 * M, 20 * M, "transformer", "500M", "transformer_d256"),
               "pruned": stage(None, None, 15 * M, "transformer", "500M", "transformer_d256"),
               "int8": stage(32.75, 400 * M, 5 * M, "transformer", "500M", "transformer_d256")},
    "backends": {}}
BENCH_B = {"command": "lite bench --source test2016.de --model runs/b/int8 --ct2 runs/b/ck.pt", "config": {},
           "targets": [], "machine": {},
           "results": [result("onnx:int8", "onnx", 1, 20.0, 22.0, 400.0, 120.0, 5 * M, 32.75, ONNX_B),
                       result("ct2-int8:ck.pt", "ct2", 1, 0, 0, 0, 0, 0, 0, [], error="ct2 cannot run lsra")]}


def write_run(root: Path, summary: dict | None, bench: dict | None) -> Path:
    root.mkdir(parents=True)
    if summary is not None:
        (root / "report").mkdir()
        (root / "report" / "summary.json").write_text(json.dumps(summary))
    if bench is not None:
        (root / "bench.json").write_text(json.dumps(bench))
    return root


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = write_run(root / "a", SUMMARY_A, BENCH_A)
    b = write_run(root / "b", SUMMARY_B, BENCH_B)
    index = report([a, b], command="lite report a b")
    return a, b, index


def plot_json(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_pareto_frontier_is_the_hand_computed_one(rendered):
    a, _, index = rendered
    data = plot_json(index.parent, "bleu_vs_macs")["data"]
    # (MACs M, BLEU): a fp32 (100, 30), pruned (60, 28.5), finetuned (60, 29.5), int8 (60, 29.25);
    # b small (40, 26), fp32 (400, 33), int8 (400, 32.75); b pruned has no BLEU and no MACs: not a point.
    # Dominated: a pruned and a int8 (by a finetuned: same MACs, more BLEU), b int8 (by b fp32).
    assert [(p["run"], p["stage"]) for p in data["frontier"]] == [
        ("b", "small"), ("a", "finetuned"), ("a", "fp32"), ("b", "fp32")]
    assert len(data["points"]) == 7
    expected = {(run, s): v for run, summary in (("a", SUMMARY_A), ("b", SUMMARY_B))
                for s, v in summary["stages"].items()}
    for p in data["points"]:
        src = expected[p["run"], p["stage"]]
        assert (p["bleu"], p["macs"], p["family"], p["budget"], p["arch"]) == (
            src["bleu"], src["macs"], src["family"], src["budget"], src["arch"])


def test_default_out_is_beside_the_first_summary_and_keeps_it(rendered):
    a, _, index = rendered
    assert index == a / "report" / "index.html"
    assert json.loads((a / "report" / "summary.json").read_text()) == SUMMARY_A


def test_tables_hold_the_numbers(rendered):
    _, _, index = rendered
    md, page = (index.parent / "report.md").read_text(), index.read_text()
    # stages: BLEU 2 decimals, MACs and params in millions, MB = bytes / 1e6
    rows = ["| a | fp32 | lsra | lsra_100m | 100M | 30.00 | 100.0 | 2.000 | 1.000 | 8.00 |",
            "| a | int8 | lsra | lsra_100m | 100M | 29.25 | 60.0 | 2.000 | 1.000 | 1.30 |",
            "| b | pruned | transformer | transformer_d256 | 500M | – | – | 2.000 | 1.000 | 15.00 |",
            # backends: × first = the run's first backend at the same thread count (torch 180 ms at 1 thread)
            "| a | torch:checkpoint_best.pt | 1 | 180.0 | 200.0 | 50 | 400 | 8.00 | 30.00 | 1.00 | bench.json |",
            "| a | onnx:fp32 | 1 | 60.0 | 70.0 | 150 | 200 | 8.10 | 30.00 | 3.00 | bench.json |",
            "| a | onnx:fp32 | 2 | 40.0 | 45.0 | 250 | 210 | 8.10 | 30.00 | 1.00 | bench.json |",
            "| a | onnx:int8 | 1 | 45.0 | 50.0 | 200 | 150 | 2.30 | 29.25 | 4.00 | summary.json |",
            "| b | onnx:int8 | 1 | 20.0 | 22.0 | 400 | 120 | 5.00 | 32.75 | 1.00 | bench.json |"]
    for row in rows:
        assert row in md
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in page.replace('<td class="n">', "<td>")
    assert "999" not in md  # the summary's copy of a backend bench.json measured is not shown
    assert "| b | ct2-int8:ck.pt | 1 | error: ct2 cannot run lsra |" in md


def test_html_is_offline_one_embedded_image_per_plot(rendered):
    _, _, index = rendered
    out, page = index.parent, index.read_text()
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == sorted(["bleu_vs_macs", "bleu_vs_latency", "size_by_stage", "latency_vs_length"])
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert page.count("<img") == len(sources) == len(pngs)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {p.read_bytes() for p in pngs}
    assert "http:" not in page and "https:" not in page and "<link" not in page and "<script" not in page
    assert "url(" not in page
    for href in re.findall(r'\bhref="([^"]*)"', page):  # links only to the JSON files beside the page
        assert (out / href).is_file()


def test_markdown_references_existing_pngs(rendered):
    _, _, index = rendered
    md = (index.parent / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 4
    for image in images:
        assert (index.parent / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_figure_names_its_files_and_commands(rendered):
    a, b, index = rendered
    md, page = (index.parent / "report.md").read_text(), index.read_text()
    sources = plot_json(index.parent, "bleu_vs_latency")["sources"]
    assert {(s["file"], s["command"]) for s in sources} == {
        (str(a / "bench.json"), None), (str(a / "report" / "summary.json"), SUMMARY_A["command"]),
        (str(b / "bench.json"), BENCH_B["command"])}
    assert f"`{b / 'bench.json'}`, written by `{BENCH_B['command']}`" in md
    assert f"`{a / 'bench.json'}`, written by a command not recorded" in md
    assert SUMMARY_A["command"] in page and "Made by <code>lite report a b</code>" in page


def test_plot_json_is_the_input_data(rendered):
    _, _, index = rendered
    out = index.parent
    bars = plot_json(out, "size_by_stage")["data"]["bars"]
    assert bars == [{"run": "a", "stage": s, "bytes": v["bytes"]} for s, v in SUMMARY_A["stages"].items()] + \
        [{"run": "b", "stage": s, "bytes": v["bytes"]} for s, v in SUMMARY_B["stages"].items()]
    points = plot_json(out, "bleu_vs_latency")["data"]["points"]
    assert [(p["run"], p["target"], p["threads"], p["latency_ms_p50"], p["bleu"]) for p in points] == [
        ("a", "torch:checkpoint_best.pt", 1, 180.0, 30.0), ("a", "onnx:fp32", 1, 60.0, 30.0),
        ("a", "onnx:fp32", 2, 40.0, 30.0), ("a", "onnx:int8", 1, 45.0, 29.25), ("b", "onnx:int8", 1, 20.0, 32.75)]
    data = plot_json(out, "latency_vs_length")["data"]
    assert data["bucket_words"] == 5
    series = {(s["run"], s["target"], s["threads"]): s for s in data["series"]}
    assert set(series) == {("a", "torch:checkpoint_best.pt", 1), ("a", "onnx:fp32", 1), ("b", "onnx:int8", 1)}
    # medians per 5 words: torch 1-5 (3, 4 words: 100, 120 ms) -> 3.5 words, 110 ms; 6-10 (7, 9: 190, 210) -> 8, 200;
    # 11-15 (12: 300) -> 12, 300
    expected = {("a", "torch:checkpoint_best.pt", 1): (TORCH_A, [(3.5, 110.0), (8, 200.0), (12, 300.0)]),
                ("a", "onnx:fp32", 1): (ONNX_A, [(3.5, 35.0), (8, 65.0), (12, 100.0)]),
                ("b", "onnx:int8", 1): (ONNX_B, [(2, 15.0), (6, 25.0)])}
    for key, (pairs, medians) in expected.items():
        assert series[key]["latency_by_length"] == pairs
        assert [(m["median_words"], m["median_ms"]) for m in series[key]["medians"]] == medians
    assert [(m["words_min"], m["words_max"], m["sentences"]) for m in series[key]["medians"]] == [(1, 5, 1), (6, 10, 1)]


def test_a_plot_without_data_is_a_note_and_its_old_files_go(tmp_path):
    run = write_run(tmp_path / "bench_only", None, BENCH_B)
    out = tmp_path / "out"
    out.mkdir()
    (out / "bleu_vs_macs.png").write_bytes(b"stale")
    index = report([run], out)
    md = (out / "report.md").read_text()
    assert "BLEU vs MACs: left out, no stage with both bleu and macs in any report/summary.json." in md
    assert "left out, no stage with bytes" in md
    assert sorted(p.name for p in out.glob("*.png")) == ["bleu_vs_latency.png", "latency_vs_length.png"]
    assert index.read_text().count("<img") == 2


def test_a_run_dir_without_inputs_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=f"^{re.escape(str(empty))}: nothing to report: neither "
                                          r"report/summary.json .* nor bench.json") as e:
        report([empty])
    assert "\n" not in str(e.value)
    with pytest.raises(ReportError, match="no such run dir"):
        report([tmp_path / "missing"])


def test_invalid_json_names_the_file(tmp_path):
    run = write_run(tmp_path / "bad", SUMMARY_B, None)
    (run / "bench.json").write_text('{"results": [')
    with pytest.raises(ReportError, match=f"^{re.escape(str(run / 'bench.json'))}: not valid JSON") as e:
        report([run])
    assert "\n" not in str(e.value)
    (run / "bench.json").write_text(json.dumps({"results": [{"target": "x", "threads": "one"}]}))
    with pytest.raises(ReportError, match=r"bench.json: results\[0\].threads is 'one', not a number"):
        report([run])


def test_cli_prints_the_page_path(tmp_path, capsys):
    run = write_run(tmp_path / "a", SUMMARY_A, BENCH_A)
    parser = argparse.ArgumentParser()
    report_cli.register(parser.add_subparsers())
    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "r"), "--title", "A & B"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "index.html")
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<title>A &amp; B</title>" in page and "lite report" in page
