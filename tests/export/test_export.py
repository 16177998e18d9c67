"""ONNX export: every family's graphs equal PyTorch; the runtime translator (no torch) equals fairseq-generate;
bad graphs and model dirs are refused with a clear error."""
import ast
import copy
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from export.exporter import ExportError, check_graph, export, export_graphs, gemms_as_matmuls
from export.model_dir import ModelDirError, StateSpec
from export.runtime import Translator
from export.search import SearchOptions
from export.validate import ExportMismatch, onnx_runner, validate
from eval.evaluate import evaluate
from eval.macs import paper_macs
from lite.checkpoint import load_model
from lite.files import OutputError
from lite.modules import MIXERS
from lite.torch_translator import TorchTranslator
from tests.conftest import LITE, LITE_ARCHS, ROOT, fairseq_generate, run, tiny_dictionary, tiny_model
from tests.figures import tally

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter

# one architecture per family: (mixer, convolution, chunked)
EXPORTED = ["transformer_d128", "lsra_iwslt_160", "lsra_wmt_200", "flash_quad_100m", "flash_100m", "fastformer_100m",
            "linear_100m", "performer_100m", "local_100m", "synthesizer_dense_100m", "synthesizer_random_100m",
            "linformer_100m", "memory_compressed_100m", "strided_100m", "longformer_100m",
            "bigbird_100m", "isab_100m", "routing_100m", "sinkhorn_100m",
            "poolingformer_100m", "reformer_100m"]


def family(arch: str) -> tuple:
    args = tiny_model(arch).args
    mixer = args.encoder_mixer
    return mixer, args.conv_type if mixer in ("lsra", "conv") else None, bool(args.chunk_size) if mixer == "gau" else None


def test_every_registered_family_has_an_export_test():
    covered = {family(a) for a in EXPORTED}
    missing = sorted({a for a in LITE_ARCHS if family(a) not in covered})
    assert not missing, f"architectures whose family no export test covers: {missing}"
    assert {f[0] for f in covered} >= set(MIXERS) - {"conv"}  # "conv" alone has no registered architecture


def _export_tiny(arch, tmp_path, **overrides):
    model = tiny_model(arch, tiny_dictionary(), **overrides)
    reference = copy.deepcopy(model)  # export switches the traced copy into ONNX mode
    description = export_graphs(model, tmp_path)
    specs = [StateSpec.from_json(s) for s in description["states"]]
    outputs = {g: description["io"][g]["outputs"] for g in description["io"]}
    return reference, specs, outputs


@pytest.mark.parametrize("arch", EXPORTED)
def test_graphs_match_pytorch(arch, tmp_path):
    """batch {1, 3} x source length {1, 7, 33} x 10 steps with beam reordering, within 1e-4."""
    reference, specs, outputs = _export_tiny(arch, tmp_path)
    report = validate(reference, specs, onnx_runner(tmp_path / "encoder.onnx"),
                      onnx_runner(tmp_path / "decoder_step.onnx"), outputs)
    assert report.cases == 6 and report.steps == 10  # validate() raises beyond 1e-4


def test_weight_gemms_become_matmuls_that_compute_the_same(tmp_path):
    """A Linear on a 2-D input traces to Gemm, which ONNX Runtime's dynamic int8 cannot quantize: each Gemm of a
    constant weight (transposed or not, with or without a bias) becomes MatMul (+ Add), the same numbers; a Gemm
    with a scale or of two activations stays."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, v, b = (rng.standard_normal(s).astype(np.float32) for s in ((5, 4), (4, 3), (5,)))
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y1"], name="linear", transB=1),  # nn.Linear
             helper.make_node("Gemm", ["x", "w", ""], ["y2"], name="shared", transB=1),  # the same weight again
             helper.make_node("Gemm", ["x", "v"], ["y3"], name="plain"),
             helper.make_node("Gemm", ["x", "v"], ["y4"], name="scaled", alpha=2.0),
             helper.make_node("Gemm", ["x", "x"], ["y5"], name="activations", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, n]) for y, n in
                               (("y1", 5), ("y2", 5), ("y3", 3), ("y4", 3), ("y5", 2))],
                              [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (v, "v"), (b, "b"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "gemm.onnx"))
    x = rng.standard_normal((2, 4)).astype(np.float32)
    assert gemms_as_matmuls(model) == 3
    onnx.checker.check_model(model, full_check=True)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops == {"linear": "MatMul", "linear.bias": "Add", "shared": "MatMul", "plain": "MatMul",
                   "scaled": "Gemm", "activations": "Gemm"}
    assert {i.name for i in model.graph.initializer} == {"w.T", "v", "b"}  # w held once, transposed
    onnx.save(model, str(tmp_path / "matmul.onnx"))
    expected, actual = (onnx_runner(tmp_path / f"{name}.onnx")({"x": x}) for name in ("gemm", "matmul"))
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_a_weight_that_a_nested_graph_reads_is_kept_beside_its_transpose(tmp_path):
    """The rewrite drops a weight that only its Gemms read; a branch of an If reads the outer scope by name, so a
    weight read there stays."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["branch_w"])], "branch", [],
                               [helper.make_tensor_value_info("branch_w", TensorProto.FLOAT, [5, 4])])
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="linear", transB=1),
             helper.make_node("If", ["flag"], ["z"], name="nested", then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [5, 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert gemms_as_matmuls(model) == 1
    assert {i.name for i in model.graph.initializer} == {"w", "w.T"}
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "matmul.onnx"))
    x = rng.standard_normal((2, 4)).astype(np.float32)
    y, z = onnx_runner(tmp_path / "matmul.onnx")({"x": x, "flag": np.array(True)})
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(z, w)


def test_reformer_rounds_and_short_chunks_match_pytorch(tmp_path):
    """Reformer beyond its preset: 3 hash rounds (the logsumexp combination) and chunks of 3, shorter than most
    sources (the sort, several chunks and the scatter back) in the encoder; 3 rounds of cached buckets in the step."""
    reference, specs, outputs = _export_tiny("reformer_100m", tmp_path, reformer_hashes=3, reformer_chunk=3,
                                             reformer_buckets=4)
    assert {s.shape[-1] for s in specs if s.key == "bucket"} == {3}
    report = validate(reference, specs, onnx_runner(tmp_path / "encoder.onnx"),
                      onnx_runner(tmp_path / "decoder_step.onnx"), outputs)
    assert report.cases == 6 and report.steps == 10


# inner widths as pruning leaves them (heads x head dim != width), in every stateful module of the decoder step
PRUNED_WIDTHS = {
    "lsra_wmt_200": dict(mixer_attention_heads=3, mixer_attention_head_dim=5, decoder_attention_heads=3,
                         decoder_attention_head_dim=4, conv_heads=3, conv_head_dim=3),
    "flash_100m": dict(gau_hidden_dim=11, decoder_attention_heads=1, decoder_attention_head_dim=6),
}


@pytest.mark.parametrize("arch", list(PRUNED_WIDTHS))
def test_graphs_match_pytorch_with_pruned_widths(arch, tmp_path):
    """Self-attention caches [B, H, t, D], conv frames [K-1, B, H*R] and GAU state [B, ., E] take the set widths;
    cross attention's keys/values (from the encoder graph, H x D = 3 x 4 / 1 x 6) are compared as values."""
    reference, specs, outputs = _export_tiny(arch, tmp_path, **PRUNED_WIDTHS[arch])
    if arch == "lsra_wmt_200":
        assert {(s.shape[1], s.shape[3]) for s in specs if s.field == "prev_key"} == {(3, 5)}  # (H, D)
        assert {s.shape[2] for s in specs if s.key == "frames"} == {9}
    else:
        assert {s.shape[-1] for s in specs if s.key == "value"} == {11}
    report = validate(reference, specs, onnx_runner(tmp_path / "encoder.onnx"),
                      onnx_runner(tmp_path / "decoder_step.onnx"), outputs)
    assert report.cases == 6 and report.steps == 10  # validate() raises beyond 1e-4


def test_validation_reports_a_wrong_graph(tmp_path):
    reference, specs, outputs = _export_tiny("transformer_d128", tmp_path)
    with torch.no_grad():
        reference.decoder.layers[1].ffn_block.norm.bias.add_(0.01)  # the graph no longer matches the model
    with pytest.raises(ExportMismatch, match=r"decoder_step: output 'log_probs' differs from PyTorch by .* at index"):
        validate(reference, specs, onnx_runner(tmp_path / "encoder.onnx"), onnx_runner(tmp_path / "decoder_step.onnx"),
                 outputs)


def test_next_states_are_compared_relative_to_their_size():
    """A trained Performer's running sum after 10 steps: entries up to 116 off by 29 float32 ulps, a small entry of the
    same sum off by as much — it passes as a next state (tolerance 1e-4 + 1e-5 x the state's largest entry) and fails
    as log-probs (1e-4 + 1e-6 x each entry); a next state off by 1e-2 fails."""
    from export.validate import _compare

    torch_value = torch.tensor([[116.040276, 0.926627]])
    onnx_value = np.array([[116.040054, 0.926918]], dtype=np.float32)
    _compare("decoder_step", ["state.layers.5.mixer.kv.next"], [torch_value], [onnx_value], "a case")
    with pytest.raises(ExportMismatch, match="'log_probs' differs from PyTorch by 0.00029"):
        _compare("decoder_step", ["log_probs"], [torch_value], [onnx_value], "a case")
    with pytest.raises(ExportMismatch, match=r"'state.kv.next' differs from PyTorch by 0.0103 > 0.0001 \+ 1e-05 x max"):
        _compare("decoder_step", ["state.kv.next"], [torch_value], [onnx_value + np.float32([0, 1e-2])], "a case")


def test_a_graph_failing_the_checker_is_refused(tmp_path):
    import onnx

    _export_tiny("transformer_d128", tmp_path)
    graph = onnx.load(str(tmp_path / "encoder.onnx"))
    graph.graph.node[0].input[0] = "no_such_tensor"
    onnx.save(graph, str(tmp_path / "broken.onnx"))
    with pytest.raises(ExportError, match="broken.onnx: fails onnx.checker"):
        check_graph(tmp_path / "broken.onnx")


@pytest.mark.parametrize("arch", ["lsra_iwslt_160", "flash_100m"])
def test_slimmed_and_ort_format_graphs_match_pytorch(arch, tmp_path):
    """validate() raises ExportMismatch beyond its tolerance (1e-4)."""
    from export.exporter import slim_graphs
    from export.ort_format import to_ort

    reference, specs, outputs = _export_tiny(arch, tmp_path)
    slim_graphs(tmp_path)
    converted = to_ort(tmp_path)
    for paths in ({g: tmp_path / f"{g}.onnx" for g in outputs},
                  {g: next(p for p in converted if p.name.startswith(g + ".")) for g in outputs}):
        validate(reference, specs, onnx_runner(paths["encoder"]), onnx_runner(paths["decoder_step"]), outputs)


# ---------------------------------------------------------------------------------------- a trained model


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """(checkpoint, model dir): a copy of the tiny trained LSRA; what it writes stays beside the copy."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = root / "model.pt"
    shutil.copy(trained, checkpoint)
    return checkpoint, export(checkpoint, root / "onnx", slim=True, ort=True)


def test_model_dir_is_self_contained_and_described(exported):
    checkpoint, model_dir = exported
    description = json.loads((model_dir / "model.json").read_text())
    assert set(description["files"]) >= {"encoder.onnx", "decoder_step.onnx", "spm.model", "vocab.txt"}
    assert any(name.startswith("ort/") for name in description["files"])
    assert set(description["validation"]) == {"onnx", "ort"}
    assert description["macs"] == paper_macs(load_model(checkpoint)[0]).total


def test_onnx_translator_matches_fairseq_generate(workdir, exported):
    checkpoint, model_dir = exported
    sources = (workdir / "data" / "raw" / "test.de").read_text(encoding="utf-8").splitlines()
    fairseq = fairseq_generate(workdir, checkpoint)
    ours = Translator(model_dir, SearchOptions(beam=4)).translate(sources)
    same = sum(fairseq[i] == ours[i] for i in range(len(sources)))
    assert len(fairseq) == len(sources) and same / len(sources) >= 0.99, same
    onnx_bleu = evaluate(model_dir, "test", backend="onnx", out_dir=model_dir.parent / "eval_onnx")["bleu"]
    torch_bleu = evaluate(checkpoint, "test", out_dir=model_dir.parent / "eval_torch")["bleu"]
    assert abs(onnx_bleu - torch_bleu) <= 0.1


def test_ort_format_and_greedy_match_torch(workdir, exported):
    checkpoint, model_dir = exported
    sources = (workdir / "data" / "raw" / "test.de").read_text(encoding="utf-8").splitlines()[:40]
    greedy = TorchTranslator(checkpoint, options=SearchOptions(beam=1)).translate(sources)
    assert Translator(model_dir, SearchOptions(beam=1), format="ort").translate(sources) == greedy


def test_runtime_imports_no_torch(exported):
    _, model_dir = exported
    code = ("import sys; sys.modules['torch'] = None\n"
            "from export.runtime import Translator\n"
            f"print(Translator({str(model_dir)!r}).translate(['Ein Hund läuft.', '', 'Zwei Katzen.']))")
    out = run([sys.executable, "-c", code], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch" not in out.stderr
    first, empty, second = ast.literal_eval(out.stdout.strip())
    assert first and empty == "" and second


def test_translate_cli_onnx_backend_with_timing(exported):
    _, model_dir = exported
    out = run([*LITE, "translate", "--backend", "onnx", "--model", str(model_dir), "--timing"],
              input="Ein Hund läuft.\n\nZwei Katzen.\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.split("\n")) == 4 and out.stdout.split("\n")[1] == ""
    assert "ms/sentence" in out.stderr


def test_long_sentences_are_truncated_with_a_warning(exported, caplog):
    _, model_dir = exported
    translator = Translator(model_dir, SearchOptions(beam=1))
    long = " ".join(["Hund"] * 2000)
    assert len(translator.translate([long])) == 1
    assert "truncated" in caplog.text


def _copy(model_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(model_dir, target)
    return target


def _refused(model_dir, match: str, **kwargs) -> None:
    """The translator refuses ``model_dir`` with one line matching ``match`` (counted for the reliability figures)."""
    with pytest.raises(ModelDirError, match=match) as refusal:
        Translator(model_dir, **kwargs)
    assert "\n" not in str(refusal.value)
    tally("hostile model dirs refused")


def test_missing_or_altered_files_are_refused(exported, tmp_path):
    _, model_dir = exported
    missing = _copy(model_dir, tmp_path / "a")
    (missing / "decoder_step.onnx").unlink()
    _refused(missing, "decoder_step.onnx is missing")
    altered = _copy(model_dir, tmp_path / "b")
    with open(altered / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    _refused(altered, "encoder.onnx does not match its sha256")
    cli = run([*LITE, "translate", "--backend", "onnx", "--model", str(altered)], input="Hund\n")
    assert cli.returncode == 2 and "does not match its sha256" in cli.stderr


def _rewrite(model_dir, name, text):
    """Replace a file and its hash: a consistent-looking but mismatched dir."""
    from export.model_dir import sha256

    (model_dir / name).write_text(text, encoding="utf-8")
    description = json.loads((model_dir / "model.json").read_text())
    description["files"][name] = sha256(model_dir / name)
    (model_dir / "model.json").write_text(json.dumps(description))


def test_mismatched_dictionary_or_sentencepiece_is_refused(exported, tmp_path):
    _, model_dir = exported
    short = _copy(model_dir, tmp_path / "a")
    symbols = (short / "vocab.txt").read_text(encoding="utf-8").splitlines()
    _rewrite(short, "vocab.txt", "\n".join(symbols[:-8]) + "\n")
    _refused(short, "vocab.txt has .* entries, the graphs")
    foreign = _copy(model_dir, tmp_path / "b")
    _rewrite(foreign, "vocab.txt", "\n".join(symbols[:4] + [f"zz{i}" for i in range(len(symbols) - 4)]) + "\n")
    _refused(foreign, "sentencepiece model and dictionary do not match")


def test_existing_out_dir_needs_force(exported, tmp_path):
    checkpoint, model_dir = exported
    with pytest.raises(OutputError, match="--force"):
        export(checkpoint, model_dir)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="not a model dir"):
        export(checkpoint, other, force=True)
    assert (other / "a.txt").read_text() == "x"  # nothing lost


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "ort/../../x", ""])
def test_model_dir_names_outside_the_dir_are_refused(exported, tmp_path, name):
    _, model_dir = exported
    hostile = _copy(model_dir, tmp_path)
    description = json.loads((hostile / "model.json").read_text())
    description["files"][name] = "0" * 64
    (hostile / "model.json").write_text(json.dumps(description))
    _refused(hostile, "not a plain relative name")


def test_unlisted_and_linked_files_are_refused(exported, tmp_path):
    _, model_dir = exported
    unlisted = _copy(model_dir, tmp_path / "a")
    description = json.loads((unlisted / "model.json").read_text())
    ort_names = [n for n in description["files"] if n.startswith("ort/")]
    for name in ort_names:  # the ORT graphs are on disk but not listed: not part of the model
        del description["files"][name]
    (unlisted / "model.json").write_text(json.dumps(description))
    Translator(unlisted)  # the ONNX graphs are listed and fine
    _refused(unlisted, "ORT-format encoder graphs listed", format="ort")
    linked = _copy(model_dir, tmp_path / "b")
    (linked / "spm.model").unlink()
    (linked / "spm.model").symlink_to(model_dir / "spm.model")
    _refused(linked, "symbolic link")


def test_swapped_and_oversized_graphs_are_refused(exported, tmp_path):
    from export.model_dir import MAX_FILE_BYTES, sha256

    _, model_dir = exported
    swapped = _copy(model_dir, tmp_path / "a")  # the two graphs trade places, manifest recomputed to match
    (swapped / "encoder.onnx").rename(swapped / "tmp")
    (swapped / "decoder_step.onnx").rename(swapped / "encoder.onnx")
    (swapped / "tmp").rename(swapped / "decoder_step.onnx")
    description = json.loads((swapped / "model.json").read_text())
    for name in ("encoder.onnx", "decoder_step.onnx"):
        description["files"][name] = sha256(swapped / name)
    (swapped / "model.json").write_text(json.dumps(description))
    _refused(swapped, "encoder.onnx: its inputs/outputs are not those model.json lists")
    huge = _copy(model_dir, tmp_path / "b")  # a sparse file: no disk used, refused before it is read
    with open(huge / "decoder_step.onnx", "r+b") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    _refused(huge, "decoder_step.onnx is 2,147,483,649 bytes, over")
