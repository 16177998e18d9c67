"""The token mixers' table: a row for every registered mixer, MACs from the counter, a run's figures where it has
the preset, and the CLI."""
import json

import pytest

from eval.macs import paper_macs
from eval.macs_table import millions
from eval.mechanisms import MECHANISMS, markdown_table, preset_macs, run_figures
from lite.models.factory import build_arch
from lite.modules import CAUSAL_MIXERS, MIXERS
from tests.conftest import LITE, ROOT, run


def test_every_registered_mixer_has_a_row():
    assert sorted(m.mixer for m in MECHANISMS) == sorted(MIXERS)


def test_an_encoder_only_row_says_why_and_keeps_no_state():
    assert {m.mixer for m in MECHANISMS if m.no_decoder} == set(MIXERS) - CAUSAL_MIXERS
    assert all(bool(m.state) == (m.mixer in CAUSAL_MIXERS) for m in MECHANISMS if m.presets)


def _summary(tmp_path):
    report = tmp_path / "report"
    report.mkdir(parents=True)
    (report / "summary.json").write_text(json.dumps({
        "stages": {"local/fp32": {"bleu": 31.25, "arch": "local_100m", "macs": 98},
                   "local/int8": {"bleu": 31.0, "arch": "local_100m", "macs": 98},
                   "lsra/fp32": {"bleu": 30.0, "arch": "lsra_100m", "macs": 97},
                   "lsra/int8": {"bleu": 29.0, "arch": "lsra_100m", "macs": 78}},  # int8 of a pruned model
        "backends": {"onnx:local/int8@1": {"latency_ms_p50": 41.27}, "onnx:local/int8@2": {"latency_ms_p50": 60.0},
                     "torch:local/fp32@1": {"latency_ms_p50": 165.08},  # fairseq on the fp32 checkpoint
                     "onnx:lsra/int8@1": {"latency_ms_p50": 40.0}, "torch:lsra/fp32@1": {"latency_ms_p50": 99.0}}}))
    return tmp_path


def test_table_takes_macs_from_the_counter_and_figures_from_the_run(tmp_path):
    """Through the CLI (one table: each preset is built and counted once)."""
    out = run([*LITE, "macs", "--mechanisms", "--run-dir", str(_summary(tmp_path))])
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[6].strip(): line for line in out.stdout.split("\n") if line.startswith("| `")}
    assert len(rows) == sum(max(len(m.presets), 1) for m in MECHANISMS)
    assert f"{paper_macs(build_arch('local_100m', 10_000)).total / 1e6:.1f}M" in rows["`local_100m`"]
    # fp32 BLEU; int8 at 1 thread: its latency, fairseq's over it
    assert rows["`local_100m`"].endswith("| 31.25 | – | – | 41.3 | 4.0× |")
    assert rows["`strided_100m`"].endswith("| – | – | – | – | – |")  # not in the run
    assert rows["`lsra_100m`"].endswith("| 30.00 | – | – | – | – |")  # its int8 is another (pruned) model
    assert "| no: the length projection mixes every position (its preset's decoder: attention) |" in rows[
        "`linformer_100m`"]
    assert "| yes | yes |" in rows["`local_100m`"]
    assert run_figures() == {}


def test_figures_from_several_runs_the_last_wins(tmp_path):
    first, second = _summary(tmp_path / "a"), tmp_path / "b" / "report"
    second.mkdir(parents=True)
    (second / "summary.json").write_text(json.dumps({
        "stages": {"linear/fp32": {"bleu": 28.5, "arch": "linear_100m", "macs": 98,
                                   "bleu_at_updates": {"1400": 25.0, "2000": 27.0}},  # eval_at_updates
                   "local/fp32": {"bleu": 33.0, "arch": "local_100m", "macs": 98}}, "backends": {}}))
    out = run([*LITE, "macs", "--mechanisms", "--run-dir", str(first), "--run-dir", str(second.parent)])
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[6].strip(): line for line in out.stdout.split("\n") if line.startswith("| `")}
    assert rows["`linear_100m`"].endswith("| 28.50 | – | 27.00 | – | – |")  # its checkpoint's at 2,000 updates
    assert rows["`local_100m`"].endswith("| 33.00 | – | – | – | – |")  # the second run's, without its latency
    assert rows["`lsra_100m`"].endswith("| 30.00 | – | – | – | – |")  # only in the first
    assert (f"BLEU from `{first}` (`lite pipeline`) for `lsra_100m`; `{second.parent}` (`lite pipeline`) for "
            "`linear_100m`, `local_100m`.") in out.stdout


def _bench(tmp_path, models: dict[str, tuple[str, dict | None]], results: list[tuple[str, int, float, str | None]],
           macs: dict[str, int | None] | None = None, fairseq: dict[str, float] | None = None):
    """A ``lite bench`` output over model dirs {name: (arch, quantization)}, each exported from <name>.pt, with their
    preset's MACs unless ``macs`` says otherwise (None: not recorded); results (name, threads, p50, error); fairseq
    {name: p50} timed at 1 thread on the checkpoints of those named."""
    for name, (arch, quantization) in models.items():
        (tmp_path / name).mkdir(parents=True)
        description = {"arch": arch, "quantization": quantization, "macs": preset_macs(arch),
                       "checkpoint": str((tmp_path / f"{name}.pt").resolve())}
        if name in (macs or {}):
            description["macs"] = macs[name]
        (tmp_path / name / "model.json").write_text(json.dumps({k: v for k, v in description.items()
                                                                 if v is not None}))
    targets = [{"backend": backend, "path": str(tmp_path / path), "quantization": None, "data": None, "label": None,
                "shortlist": None} for backend, names, suffix in (("onnx", models, ""), ("torch", fairseq or {}, ".pt"))
               for path in (name + suffix for name in names)]
    timed = [(f"onnx:{name}", threads, p50, error) for name, threads, p50, error in results]
    timed += [(f"torch:{name}.pt", 1, p50, None) for name, p50 in (fairseq or {}).items()]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"targets": targets, "results": [
        {"target": target, "backend": target.split(":")[0], "threads": threads, "error": error,
         "figures": {} if error else {"latency_ms_p50": p50}}
        for target, threads, p50, error in timed]}))
    return path


def test_bench_gives_every_latency_from_one_run(tmp_path):
    """--bench: the int8 dirs' latencies at 1 thread, by their model.json arch; the runs' latencies are dropped."""
    bench = _bench(tmp_path / "bench", {"local8": ("local_100m", {"method": "ort-dynamic"}),
                                        "local32": ("local_100m", None),
                                        "linear8": ("linear_100m", {"method": "ort-dynamic"}),
                                        "strided8": ("strided_100m", {"method": "ort-dynamic"})},
                   [("local8", 1, 12.34, None), ("local8", 2, 8.0, None), ("local32", 1, 30.0, None),
                    ("linear8", 1, 9.87, None), ("strided8", 1, 0.0, "worker died")])
    out = run([*LITE, "macs", "--mechanisms", "--run-dir", str(_summary(tmp_path / "run")), "--bench", str(bench)])
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[6].strip(): line for line in out.stdout.split("\n") if line.startswith("| `")}
    assert rows["`local_100m`"].endswith("| 31.25 | – | – | 12.3 | – |")  # the run's BLEU, the bench's latency
    assert rows["`linear_100m`"].endswith("| – | – | – | 9.9 | – |")  # only benched
    assert rows["`lsra_100m`"].endswith("| 30.00 | – | – | – | – |")
    assert rows["`strided_100m`"].endswith("| – | – | – | – | – |")  # its bench target failed
    assert f"Latency from `{bench}` (one `lite bench` run)" in out.stdout


def test_bench_gives_the_speedup_over_fairseq_on_the_checkpoint_of_each_dir(tmp_path):
    """Where the bench also timed fairseq on the checkpoint a dir was exported from (model.json's ``checkpoint``):
    fairseq's p50 over the int8 model's, from the same run, kept in the record beside the latency."""
    bench = _bench(tmp_path / "bench", {"local8": ("local_100m", {"method": "ort-dynamic"}),
                                        "linear8": ("linear_100m", {"method": "ort-dynamic"}),
                                        "strided8": ("strided_100m", {"method": "ort-dynamic"})},
                   [("local8", 1, 10.0, None), ("linear8", 1, 8.0, None), ("strided8", 1, 0.0, "worker died")],
                   fairseq={"local8": 65.0, "strided8": 50.0})
    record = tmp_path / "record.json"
    table = markdown_table(bench_json=bench, record=record)
    rows = _rows(table)
    assert rows["`local_100m`"].endswith("| – | – | – | 10.0 | 6.5× |")
    assert rows["`linear_100m`"].endswith("| – | – | – | 8.0 | – |")  # fairseq not timed on its checkpoint
    assert rows["`strided_100m`"].endswith("| – | – | – | – | – |")  # its int8 model failed
    assert f"Speed-up from `{bench}` (one `lite bench` run) for `local_100m`." in table
    kept = json.loads(record.read_text())["presets"]["local_100m"]
    assert (kept["speedup"], kept["speedup_from"]) == (6.5, f"`{bench}` (one `lite bench` run)")
    other = _bench(tmp_path / "other", {"local8": ("local_100m", {"method": "ort-dynamic"})},
                   [("local8", 1, 20.0, None)], fairseq={"local8": 60.0})  # another checkpoint's dir
    document = json.loads(other.read_text())
    document["targets"][-1]["path"] = str(tmp_path / "bench" / "local8.pt")  # fairseq on the first one's
    other.write_text(json.dumps(document))
    rows = _rows(markdown_table(bench_json=other, record=record))
    assert rows["`local_100m`"].endswith("| – | – | – | 20.0 | 6.5× |")  # the new latency, the first's ratio
    assert rows["`linear_100m`"].endswith("| – | – | – | 8.0 | – |")


def test_bench_with_two_int8_models_of_one_preset_is_refused(tmp_path):
    bench = _bench(tmp_path, {"a": ("local_100m", {"method": "ort-dynamic"}),
                              "b": ("local_100m", {"method": "ort-static"})},
                   [("a", 1, 1.0, None), ("b", 1, 2.0, None)])
    refused = run([*LITE, "macs", "--mechanisms", "--bench", str(bench)])
    assert refused.returncode == 2 and "two int8 models of local_100m" in refused.stderr


def test_bench_leaves_out_a_pruned_dir_and_refuses_one_without_macs(tmp_path):
    """A dir with fewer MACs than its preset (pruned) is not the preset: warned of and left out, so it is not a
    second model of it either; a model.json without MACs cannot be told: one line."""
    bench = _bench(tmp_path / "a", {"local8": ("local_100m", {"method": "ort-dynamic"}),
                                    "pruned8": ("local_100m", {"method": "ort-dynamic"})},
                   [("local8", 1, 12.0, None), ("pruned8", 1, 5.0, None)], macs={"pruned8": 80_000_000})
    out = run([*LITE, "macs", "--mechanisms", "--bench", str(bench)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert _rows(out.stdout)["`local_100m`"].endswith("| – | – | – | 12.0 | – |")
    assert f"pruned8: 80.0M MACs, not local_100m's {millions(preset_macs('local_100m'))}" in out.stderr
    bench = _bench(tmp_path / "b", {"old8": ("local_100m", {"method": "ort-dynamic"})}, [("old8", 1, 1.0, None)],
                   macs={"old8": None})
    refused = run([*LITE, "macs", "--mechanisms", "--bench", str(bench)])
    assert refused.returncode == 2 and "does not record the model's MACs" in refused.stderr


def test_bench_keeps_our_search_and_names_a_moved_dir(tmp_path):
    """A ``+ort-search`` target of the same dir is not a second model; a dir gone since the bench: one line."""
    bench = _bench(tmp_path, {"a": ("local_100m", {"method": "ort-dynamic"})}, [("a", 1, 1.0, None)])
    document = json.loads(bench.read_text())
    document["targets"].append({**document["targets"][0], "search": "ort"})
    document["results"].append({**document["results"][0], "target": "onnx:a+ort-search",
                                "figures": {"latency_ms_p50": 0.5}})
    bench.write_text(json.dumps(document))
    out = run([*LITE, "macs", "--mechanisms", "--bench", str(bench)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert _rows(out.stdout)["`local_100m`"].endswith("| – | – | – | 1.0 | – |")
    (tmp_path / "a" / "model.json").unlink()
    refused = run([*LITE, "macs", "--mechanisms", "--bench", str(bench)])
    assert refused.returncode == 2 and "holds no model.json (moved or deleted?)" in refused.stderr
    assert len(refused.stderr.strip().split("\n")) == 1


def _rows(stdout: str) -> dict[str, str]:
    return {line.split("|")[6].strip(): line for line in stdout.split("\n") if line.startswith("| `")}


def test_record_keeps_each_figure_with_its_run(tmp_path):
    """--record: the first table writes its figures down; a later one from another run only replaces what that run
    measured, each figure naming its run, so the table regenerates once the first run dir is gone."""
    first, record = _summary(tmp_path / "a"), tmp_path / "record.json"
    markdown_table([first], record=record)  # in process: the presets' MACs counted once for these tests
    kept = json.loads(record.read_text())["presets"]
    assert kept["local_100m"] == {"bleu": 31.25, "bleu_from": f"`{first}` (`lite pipeline`)", "latency_ms": 41.27,
                                  "latency_from": f"`{first}` (`lite pipeline`)", "speedup": 4.0,
                                  "speedup_from": f"`{first}` (`lite pipeline`)"}
    assert kept["lsra_100m"] == {"bleu": 30.0, "bleu_from": f"`{first}` (`lite pipeline`)"}  # its int8 is pruned
    second = tmp_path / "b" / "report"
    second.mkdir(parents=True)
    (second / "summary.json").write_text(json.dumps({
        "stages": {"local/fp32": {"bleu": 33.0, "arch": "local_100m", "macs": 98}}, "backends": {}}))
    (first / "report" / "summary.json").unlink()  # lost
    table = markdown_table([second.parent], record=record)
    rows = _rows(table)
    assert rows["`local_100m`"].endswith("| 33.00 | – | – | 41.3 | 4.0× |")  # the new BLEU, the kept latency
    assert rows["`lsra_100m`"].endswith("| 30.00 | – | – | – | – |")
    assert (f"BLEU from `{first}` (`lite pipeline`) for `lsra_100m`; `{second.parent}` (`lite pipeline`) for "
            f"`local_100m`. Latency from `{first}` (`lite pipeline`) for `local_100m`. Speed-up from `{first}` "
            f"(`lite pipeline`) for `local_100m`. Kept in `{record}`.") in table
    kept = json.loads(record.read_text())["presets"]
    assert kept["local_100m"]["bleu_from"] == f"`{second.parent}` (`lite pipeline`)"
    assert markdown_table(record=record) == table


def test_record_takes_a_benchs_latencies_for_the_presets_it_has(tmp_path):
    record = tmp_path / "record.json"
    markdown_table([_summary(tmp_path / "run")], record=record)
    bench = _bench(tmp_path / "bench", {"linear8": ("linear_100m", {"method": "ort-dynamic"})},
                   [("linear8", 1, 9.87, None)])
    table = markdown_table(bench_json=bench, record=record)
    rows = _rows(table)
    assert rows["`linear_100m`"].endswith("| – | – | – | 9.9 | – |")
    assert rows["`local_100m`"].endswith("| 31.25 | – | – | 41.3 | 4.0× |")  # another run's: the note says which
    assert f"`{bench}` (one `lite bench` run) for `linear_100m`" in table


def test_updates_come_from_the_checkpoint_of_the_bleu_and_stay_in_the_record(tmp_path):
    """What the CPU-time budget bought: the update count of the checkpoint the BLEU is from (the best one), kept
    beside the BLEU; a bench given with the run replaces the latency only."""
    import torch

    run_dir, record = _summary(tmp_path / "run"), tmp_path / "record.json"
    (run_dir / "local" / "checkpoints").mkdir(parents=True)
    for name, updates in (("best", 2025), ("last", 2100)):  # the BLEU is the best one's
        torch.save({"model": {}, "optimizer_history": [{"num_updates": 1800}, {"num_updates": updates}]},
                   run_dir / "local" / "checkpoints" / f"checkpoint_{name}.pt")
    bench = _bench(tmp_path / "bench", {"local8": ("local_100m", {"method": "ort-dynamic"})},
                   [("local8", 1, 12.34, None)])
    table = markdown_table([run_dir], bench_json=bench, record=record)
    assert _rows(table)["`local_100m`"].endswith("| 31.25 | 2,025 | – | 12.3 | – |")
    assert _rows(table)["`lsra_100m`"].endswith("| 30.00 | – | – | – | – |")  # its checkpoints are not there
    assert f"Updates from `{run_dir}` (`lite pipeline`) for `local_100m`." in table
    kept = json.loads(record.read_text())["presets"]["local_100m"]
    assert (kept["updates"], kept["updates_from"]) == (2025, f"`{run_dir}` (`lite pipeline`)")
    assert markdown_table(record=record) == table
    rerun = _summary(tmp_path / "rerun")  # a new BLEU whose checkpoint is gone: the old updates go with the old BLEU
    rows = _rows(markdown_table([rerun], record=record))
    assert rows["`local_100m`"].endswith("| 31.25 | – | – | 41.3 | 4.0× |")
    assert "updates" not in json.loads(record.read_text())["presets"]["local_100m"]


def test_a_record_that_is_not_one_is_refused_in_one_line(tmp_path):
    record = tmp_path / "record.json"
    for text, says in (("{not json", "not a record of `lite macs --mechanisms --record`"),
                       ('{"presets": {"lsra_10m": {"bleu": 1.0}}}', "no such 100M preset: lsra_10m"),
                       ('{"presets": {"lsra_100m": {"bleu": "36"}}}', "lsra_100m: bleu '36' from None"),
                       ('{"presets": {"lsra_100m": {"updates": 1400}}}', "lsra_100m: updates 1400 from None"),
                       ('{"presets": {"lsra_100m": {"updates": 1400.5, "updates_from": "a run"}}}',
                        "lsra_100m: updates 1400.5 from 'a run'"),
                       ('{"presets": {"lsra_100m": 36.0}}', "not a record")):
        record.write_text(text)
        refused = run([*LITE, "macs", "--mechanisms", "--record", str(record)])
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr[-2000:]
        assert len(refused.stderr.strip().split("\n")) == 1
        assert record.read_text() == text  # left as it was


@pytest.fixture(scope="module")
def local_checkpoint(workdir, tmp_path_factory):
    """A real local_100m checkpoint after one update."""
    from lite.train import load_config, train

    save_dir = tmp_path_factory.mktemp("local")
    config = load_config(ROOT / "configs/models/local/100m.yaml",
                         [f"data={workdir / 'data'}", f"save_dir={save_dir}", "max_update=1"])
    assert train(config) == 0
    return save_dir / "checkpoint_best.pt"


def _eval_results(tmp_path, results: dict[str, tuple]) -> None:
    """``lite eval --checkpoint`` results {name: (checkpoint, backend, bleu)} as tmp_path/<name>.json."""
    for name, (checkpoint, backend, bleu) in results.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"checkpoint": str(checkpoint), "backend": backend,
                                                           "bleu": bleu}))


def test_eval_gives_a_checkpoints_bleu_to_its_preset(local_checkpoint, trained_transformer, tmp_path):
    """--eval: a ``lite eval --checkpoint`` result's BLEU goes to the checkpoint's preset (here local_100m after one
    update); a checkpoint whose MACs are not its arch's preset (the tiny Transformer: transformer_d128 at embed 32)
    is left out with a warning; an ONNX result is refused."""
    _eval_results(tmp_path, {"local": (local_checkpoint, "torch", 12.345),
                             "tiny": (trained_transformer, "torch", 20.0), "onnx": (trained_transformer, "onnx", 1.0)})
    out = run([*LITE, "macs", "--mechanisms", "--run-dir", str(_summary(tmp_path / "run")),
               "--eval", str(tmp_path / "local.json"), "--eval", str(tmp_path / "tiny.json")])
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(out.stdout)
    assert rows["`local_100m`"].endswith("| 12.35 | 1 | – | – | – |")  # the eval's, not the run's; one update
    assert rows["`lsra_100m`"].endswith("| 30.00 | – | – | – | – |")  # the run's
    assert "MACs, not transformer_d128's 86.7M (pruned?): left out" in out.stderr
    assert f"`{tmp_path / 'local.json'}` (`lite eval --checkpoint`) for `local_100m`" in out.stdout
    refused = run([*LITE, "macs", "--mechanisms", "--eval", str(tmp_path / "onnx.json")])
    assert refused.returncode == 2 and "--eval takes a checkpoint's (fp32)" in refused.stderr


def test_eval_2000_gives_the_bleu_at_2000_updates_beside_the_runs(local_checkpoint, tmp_path):
    """--eval-2000: the BLEU of a run's checkpoint at 2,000 updates, in its own column beside the run's figures and
    kept in the record; a checkpoint at another count is refused in one line; a new BLEU (another training) takes the
    record's away."""
    import torch

    at_2000 = tmp_path / "checkpoint_9_2000.pt"
    state = torch.load(local_checkpoint, weights_only=False)
    state["optimizer_history"][-1]["num_updates"] = 2000
    torch.save(state, at_2000)
    _eval_results(tmp_path, {"at2000": (at_2000, "torch", 28.456), "at1": (local_checkpoint, "torch", 1.0)})
    record = tmp_path / "record.json"
    table = markdown_table([_summary(tmp_path / "run")], record=record, fixed_eval_jsons=[tmp_path / "at2000.json"])
    assert _rows(table)["`local_100m`"].endswith("| 31.25 | – | 28.46 | 41.3 | 4.0× |")  # the run's, then at 2,000
    assert _rows(table)["`lsra_100m`"].endswith("| 30.00 | – | – | – | – |")
    source = f"`{tmp_path / 'at2000.json'}` (`lite eval --checkpoint`)"
    assert f"BLEU at 2,000 updates from {source} for `local_100m`." in table
    kept = json.loads(record.read_text())["presets"]["local_100m"]
    assert (kept["bleu_fixed"], kept["bleu_fixed_from"]) == (28.456, source)
    assert markdown_table(record=record) == table
    refused = run([*LITE, "macs", "--mechanisms", "--eval-2000", str(tmp_path / "at1.json")])
    assert refused.returncode == 2 and "was trained for 1 updates; --eval-2000 takes one at 2,000" in refused.stderr
    assert len(refused.stderr.strip().split("\n")) == 1
    rerun = _summary(tmp_path / "rerun")  # another training of the preset: its BLEU at 2,000 is not known
    rows = _rows(markdown_table([rerun], record=record))
    assert rows["`local_100m`"].endswith("| 31.25 | – | – | 41.3 | 4.0× |")


def test_run_dir_needs_mechanisms(tmp_path):
    refused = run([*LITE, "macs", "--arch", "local_100m", "--eval-2000", str(tmp_path)])
    assert refused.returncode == 2
    assert "--run-dir, --eval, --eval-2000, --bench and --record go with --mechanisms" in refused.stderr
