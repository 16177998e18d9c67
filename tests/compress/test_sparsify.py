"""compress/sparsity.py and compress/sparsify.py: Zhu & Gupta's schedule, masks that only grow and hold through
optimizer steps, the weights they cover, and a real sparse fine-tune (fairseq's trainer, task sparse_translation)
whose checkpoints keep their zeros."""
from __future__ import annotations

import json
import resource
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from compress.errors import SparsityError
from compress.sparsify import CHECKPOINT_NAME, REPORT_NAME, SparsifyConfig, sparsify
from compress.sparsity import Schedule, Sparsifier, pruned_weights, sparsity_report
from lite.checkpoint import read_state
from lite.cli import main
from lite.modules import LightweightConv
from tests.conftest import TINY_CONFIG, tiny_model


def test_schedule_is_zhu_and_gupta_cubic_in_steps_of_the_interval():
    s = Schedule(0.8, begin=10, end=110, interval=10)
    assert s.at(0) == s.at(10) == s.at(19) == 0.0
    assert s.at(65) == pytest.approx(0.8 * (1 - (1 - 50 / 100) ** 3))  # t = 60 -> (60 - 10) / 100
    assert s.at(110) == s.at(10_000) == 0.8
    values = [s.at(t) for t in range(120)]
    assert values == sorted(values) and len(set(values)) == 11  # 10 steps up from 0


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(sparsity=float("nan")),
                                 dict(sparsity="0.5"), dict(sparsity=0.5, begin=5, end=4),
                                 dict(sparsity=0.5, interval=0)])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(SparsityError):
        Schedule(**bad)


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=0.5, updates=0), dict(sparsity=0.5, ramp=0),
                                 dict(sparsity=0.5, ramp=1.5)])
def test_bad_sparsify_options_are_refused_before_training(bad, tmp_path):
    with pytest.raises(SparsityError):
        sparsify(tmp_path / "missing.pt", TINY_CONFIG, tmp_path / "out", SparsifyConfig(**bad))
    assert not (tmp_path / "out").exists()


def test_pruned_weights_are_linear_and_conv_layers_not_embeddings():
    model = tiny_model("lsra_iwslt_160", share_decoder_input_output_embed=True)
    names = pruned_weights(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, LightweightConv)]
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    assert convs and {id(w) for w in names.values()} == {id(m.weight) for m in linears + convs} - tables
    assert not any("embed_tokens" in n or "output_projection" in n for n in names)
    with_tables = pruned_weights(model, embeddings=True)
    assert {id(w) for w in with_tables.values()} == {id(w) for w in names.values()} | tables


def test_masks_grow_along_the_schedule_and_hold_through_optimizer_steps():
    model = tiny_model("lsra_iwslt_160")
    sparsifier = Sparsifier(model, Schedule(0.7, begin=0, end=20, interval=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: torch.zeros_like(w, dtype=torch.bool) for n, w in sparsifier.weights.items()}
    for step in range(30):
        sparsifier.update(step)
        target = sparsifier.schedule.at(step)
        for name, w in sparsifier.weights.items():
            zeros = w == 0
            assert int(zeros.sum()) == round(target * w.numel()), (step, name)
            assert not (before[name] & ~zeros).any(), f"{name}: a pruned weight came back at step {step}"
            before[name] = zeros
        loss = sum((p ** 2).sum() for p in model.parameters()) + sum(p.sum() for p in model.parameters())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # moves every weight, the masked ones too (Adam's momentum)
        sparsifier.apply()
    report = sparsity_report(model)
    assert report["sparsity"] == pytest.approx(0.7, abs=1e-3) and set(report["layers"]) == set(sparsifier.weights)


def test_a_resumed_sparsifier_takes_its_masks_from_the_zeros():
    model = tiny_model("lsra_iwslt_160")
    Sparsifier(model, Schedule(0.5, end=1)).update(5)
    zeros = {n: (w == 0).clone() for n, w in pruned_weights(model).items()}
    resumed = Sparsifier(model, Schedule(0.5, end=1))
    with torch.no_grad():
        for w in resumed.weights.values():
            w.add_(1.0)  # an optimizer step
    resumed.apply()
    assert all(torch.equal(zeros[n], w == 0) for n, w in resumed.weights.items())


@pytest.fixture(scope="module")
def sparsified(trained, tmp_path_factory):
    """The tiny trained LSRA sparsified to 60% in a 12-update fine-tune (ramp over 6, masks every 2 updates)."""
    root = tmp_path_factory.mktemp("sparsify")
    source = root / "trained.pt"
    shutil.copy(trained, source)
    children = _children_cpu()
    report = sparsify(source, TINY_CONFIG, root / "out", SparsifyConfig(0.6, updates=12, ramp=0.5, interval=2),
                      overrides=["save_interval_updates=4"])
    return root / "out", report, _children_cpu() - children  # the OS's count for the fine-tune's (reaped) processes


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _zeros(path) -> dict[str, torch.Tensor]:
    return {k: v == 0 for k, v in read_state(path)["model"].items() if v.dim() >= 2}


def test_sparsify_fine_tunes_to_the_sparsity_and_the_zeros_stay_zero(sparsified):
    out, report, os_cpu_seconds = sparsified
    assert json.loads((out / REPORT_NAME).read_text()) == report
    assert 1.0 < report["cpu_seconds"] <= os_cpu_seconds + 0.1  # sampled every 2 s: at most what the OS counted
    assert report["updates"] == 12 and report["schedule"] == {"sparsity": 0.6, "begin": 0, "end": 6, "interval": 2}
    state = read_state(out / CHECKPOINT_NAME)["model"]
    for name, fraction in report["layers"].items():  # independent count on the stored tensors
        w = state[name]
        assert int((w == 0).sum()) == round(0.6 * w.numel()), name
        assert fraction == pytest.approx(0.6, abs=1 / w.numel())
    assert not any((state[k] == 0).float().mean() > 0.01 for k in state if "embed_tokens" in k)
    final, at_4, at_8 = (_zeros(p) for p in (out / CHECKPOINT_NAME, out / "train" / "checkpoint_1_4.pt",
                                              out / "train" / "checkpoint_1_8.pt"))
    pruned = [k for k in report["layers"]]
    assert all(torch.equal(at_8[k], final[k]) for k in pruned), "masks changed after the ramp"
    assert all(not (at_4[k] & ~final[k]).any() for k in pruned), "a weight pruned at update 4 came back"
    assert any((at_4[k] != final[k]).any() for k in pruned), "the ramp did not go on after update 4"


def test_sparse_checkpoint_translates_and_a_finished_dir_is_not_redone(sparsified, tmp_path):
    from lite.checkpoint import load_model

    out, report, _ = sparsified
    model, task = load_model(out / CHECKPOINT_NAME)
    assert type(task).__name__ == "SparseTranslationTask" and sparsity_report(model)["zeros"] == report["zeros"]
    with pytest.raises(SparsityError, match="--force"):
        sparsify(out / CHECKPOINT_NAME, TINY_CONFIG, out, SparsifyConfig(0.6, updates=12))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(SparsityError, match="not a sparsify dir"):
        sparsify(out / CHECKPOINT_NAME, TINY_CONFIG, taken, SparsifyConfig(0.6, updates=12))


@pytest.mark.parametrize("value, message", [("1", "a sparsity is a fraction of zeros in [0, 1)"),
                                            ("1.5", "a sparsity is a fraction"), ("-0.2", "a sparsity is a fraction"),
                                            ("abc", "not a number")])
def test_cli_refuses_a_bad_sparsity(value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "sparsify", str(tmp_path / "x.pt"), "--sparsity", value, "--config", str(TINY_CONFIG),
              "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def sparse_dirs(sparsified, tmp_path_factory):
    """The sparse checkpoint exported (fp32), then int8: compact (its weights packed) and --no-compact."""
    from compress.quantize import quantize
    from export.exporter import export

    out, _, _ = sparsified
    root = tmp_path_factory.mktemp("sparse_dirs")
    fp32 = export(out / CHECKPOINT_NAME, root / "fp32")
    return fp32, quantize(fp32, root / "int8"), quantize(fp32, root / "int8-plain", compact=False)


def _matmul_weights(path) -> list[np.ndarray]:
    """The constant int8 weights of a graph's MatMulInteger nodes, in node order."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {t.name: t for t in graph.initializer}
    return [numpy_helper.to_array(constants[n.input[1]]) for n in graph.node
            if n.op_type == "MatMulInteger" and n.input[1] in constants]


def test_the_packed_int8_dir_holds_exactly_the_int8_weights_and_translates_the_same(sparse_dirs, tmp_path):
    from export.model_dir import GRAPHS, ModelDir, write_description
    from export.packed_weights import PACKED
    from export.runtime import Translator

    _, int8, plain = sparse_dirs
    md = ModelDir.open(int8)
    assert (int8 / PACKED).is_file() and not (int8 / "weights.bin").exists()
    with md.readable_graphs() as graphs:
        for g in GRAPHS:  # the same int8 weights as --no-compact's, but the output projection (it reads the table)
            packed, reference = _matmul_weights(graphs[g]), _matmul_weights(ModelDir.open(plain).graph(g))
            tied = 1 if g == "decoder_step" else 0
            assert len(packed) == len(reference) - tied >= 10
            assert all(np.array_equal(p, q) for p, q in zip(packed, reference))
            assert all((q == 0).mean() >= 0.59 for q in packed if q.shape[0] > 2), "pruned weights stay zero in int8"
    dense = tmp_path / "dense"  # the same dir with weights.bin expanded on disk, as the graphs name it
    shutil.copytree(int8, dense)
    md.external_weights()["weights.bin"].tofile(dense / "weights.bin")
    (dense / PACKED).unlink()
    write_description(dense, {k: v for k, v in md.description.items() if k not in ("packed", "files")})
    lines = ["Ein Hund läuft.", "Zwei Männer spielen Fußball im Park.", "Eine Frau liest ein Buch."]
    assert Translator(int8).translate(lines) == Translator(dense).translate(lines)


def test_size_figures_of_the_packed_dir_equal_an_independent_count(sparse_dirs):
    import onnx
    from onnx import numpy_helper

    from eval.size_report import weight_bytes
    from export.model_dir import GRAPHS, ModelDir

    _, int8, plain = sparse_dirs
    md = ModelDir.open(int8)
    figures = md.description["quantization"]["compact"]["packed"]
    assert figures["packed_bytes"] == (int8 / "weights.packed").stat().st_size < figures["bytes"]
    expanded = md.external_weights()["weights.bin"]
    stored, seen = 0, set()  # each external tensor once: a bitmask and its non-zero bytes when that is smaller
    for g in GRAPHS:  # ... and the tensors inside the graphs: initializers and Constant values
        model = onnx.load(str(md.graph(g)), load_external_data=False)
        constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        for t in [*model.graph.initializer, *constants]:
            where = {e.key: e.value for e in t.external_data}
            if not where:
                stored += numpy_helper.to_array(t).nbytes
            elif where.get("offset", "0") not in seen:
                seen.add(where.get("offset", "0"))
                offset, length = int(where.get("offset", 0)), int(where["length"])
                coded = -(-length // 8) + int(np.count_nonzero(expanded[offset:offset + length]))
                stored += min(coded, length)
    found = weight_bytes(md)
    assert found.embedding + found.positions + found.other == stored
    assert found.other < 0.8 * weight_bytes(ModelDir.open(plain)).other  # the zeros kept out of the int8 weights
    quantization = md.description["quantization"]["bytes"]["total"]
    on_disk = sum((int8 / name).stat().st_size for name in ("encoder.onnx", "decoder_step.onnx", "weights.packed"))
    assert quantization["after"] == on_disk


def test_a_packed_dir_with_missing_or_altered_weights_is_refused_at_load(sparse_dirs, tmp_path):
    from export.model_dir import ModelDir, ModelDirError, sha256, write_description
    from export.packed_weights import PACKED, PackedWeightsError
    from export.runtime import Translator

    _, int8, _ = sparse_dirs
    missing, altered = tmp_path / "missing", tmp_path / "altered"
    shutil.copytree(int8, missing)
    (missing / PACKED).unlink()
    with pytest.raises(ModelDirError, match=f"{PACKED} is missing"):
        Translator(missing)
    shutil.copytree(int8, altered)
    data = bytearray((altered / PACKED).read_bytes())
    data[-1] ^= 0x01  # one stored byte changed
    (altered / PACKED).write_bytes(bytes(data))
    description = ModelDir.open(int8).description
    write_description(altered, {k: v for k, v in description.items() if k != "files"})  # its file hash made to fit
    assert description["files"][PACKED] != sha256(altered / PACKED)
    with pytest.raises(PackedWeightsError, match="sha256 differs"):
        Translator(altered)


def test_the_size_report_shows_the_zeros_and_plots_bleu_against_bytes(sparse_dirs, tmp_path):
    from eval.size_report import measure_stage, write_report

    fp32, int8, _ = sparse_dirs
    stages = [measure_stage(name, d, "test", storage=False) for name, d in (("fp32", fp32), ("int8", int8))]
    assert [s.sparsity for s in stages] == [pytest.approx(0.6, abs=1e-3)] * 2
    write_report(stages, tmp_path, "test", command="lite compress report ...")
    plot = json.loads((tmp_path / "bleu_vs_bytes.json").read_text())
    assert [(p["stage"], p["bleu"], p["weight_bytes"]) for p in plot["data"]["points"]] == \
        [(s.name, s.bleu, s.weights.other) for s in stages]
    assert (tmp_path / "bleu_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 60% |" in (tmp_path / "report.md").read_text()
