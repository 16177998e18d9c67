"""``lite compress report`` (eval/size_report.py) on the tiny trained LSRA, fp32 -> int8: every figure checked
against an independent count (files on disk, tensor sizes from the model's dimensions, the hand count of MACs in
tests/eval/test_macs.py, the translator's BLEU)."""
import json
import shutil
from pathlib import Path

import onnx
import pytest

from compress.quantize import constant_weight_matmuls, quantize
from eval.size_report import ReportError, measure_stage, source_checkpoint
from export.model_dir import ModelDir
from lite.checkpoint import load_model
from lite.cli import main
from tests.eval.test_macs import reference_decode_macs, reference_paper_macs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter


@pytest.fixture(scope="module")
def stages(trained, tmp_path_factory):
    from export.exporter import export

    root = tmp_path_factory.mktemp("report")
    checkpoint = root / "model.pt"
    shutil.copy(trained, checkpoint)
    fp32 = export(checkpoint, root / "fp32")
    int8 = quantize(fp32, root / "int8", compact=False)  # one file per graph: the byte arithmetic below
    return checkpoint, measure_stage("fp32", fp32, "test"), measure_stage("int8", int8, "test")


def test_macs_and_params_are_the_checkpoints(stages):
    checkpoint, fp32, int8 = stages
    model, _ = load_model(checkpoint)
    vocab, dim = model.decoder.embed_tokens.weight.shape
    macs = sum(reference_paper_macs(model.args, 30, 30))  # the hand count, from the checkpoint's args
    decode_macs = sum(reference_decode_macs(model.args, 30, 30, beam=4, vocab=vocab))
    for stage in (fp32, int8):  # int8 changes no MAC: measured on its fp32 source's checkpoint
        assert stage.checkpoint == str(checkpoint)
        assert (stage.macs, stage.decode_macs_beam4) == (macs, decode_macs)
        assert stage.params - stage.params_no_embed == vocab * dim  # the tied embedding, once
    assert (int8.params, int8.params_no_embed) == (fp32.params, fp32.params_no_embed)
    assert int8.quantization == "ort-dynamic" and fp32.quantization == "fp32"
    assert source_checkpoint(Path(int8.model_dir), ModelDir.open(int8.model_dir).description) == checkpoint


def test_bytes_match_the_files_and_the_model_dimensions(stages):
    checkpoint, fp32, int8 = stages
    for stage in (fp32, int8):
        files = [p for p in Path(stage.model_dir).rglob("*") if p.is_file()]
        assert stage.bytes_dir == sum(p.stat().st_size for p in files)
    model, _ = load_model(checkpoint)
    vocab, dim = model.decoder.embed_tokens.weight.shape
    positions = model.encoder.embed_positions.weights.shape[0]  # fairseq's sinusoidal table
    # fp32: the tied embedding in each graph, and the output projection (its transpose) in the decoder step
    assert fp32.weights.embedding == 3 * vocab * dim * 4
    assert fp32.weights.positions == 2 * positions * dim * 4
    # int8: the projection's weights one byte each, plus a scale (fp32) and a zero point (int8) per vocabulary row
    assert int8.weights.embedding == 2 * vocab * dim * 4 + vocab * dim + vocab * (4 + 1)
    assert int8.weights.positions == fp32.weights.positions
    # every other constant-weight MatMul: K x N fp32 -> K x N int8 + a scale (fp32) and zero point (int8) per column
    saved = 0
    for graph in ("encoder", "decoder_step"):
        model = onnx.load(str(Path(fp32.model_dir) / f"{graph}.onnx"))
        shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
        for node in model.graph.node:
            if node.name in constant_weight_matmuls(model) and vocab not in shapes[node.input[1]]:
                k, n = shapes[node.input[1]]
                saved += k * n * 4 - (k * n + n * 5)
    assert int8.weights.other == fp32.weights.other - saved
    print(f"non-embedding weights {fp32.weights.other:,} -> {int8.weights.other:,} bytes; dir {fp32.bytes_dir:,} -> "
          f"{int8.bytes_dir:,}")


def test_storage_options(stages):
    _, fp32, _ = stages
    shared = fp32.storage["shared"]["weight_bytes"]
    vocab_dim = fp32.weights.embedding // 12  # V * d
    positions_dim = fp32.weights.positions // 8
    # once: the embedding (its transposed twin and the other graph's copy dropped), one position table; and the
    # small constants both graphs hold (shapes, scalars)
    large = fp32.weights.total - 2 * vocab_dim * 4 - positions_dim * 4
    assert 0 < large - shared < 0.01 * fp32.weights.total
    assert fp32.storage["shared+fp16-embed"]["weight_bytes"] == shared - vocab_dim * 2
    vocab = json.loads((Path(fp32.model_dir) / "model.json").read_text())["vocab_size"]
    assert fp32.storage["shared+int8-embed"]["weight_bytes"] == shared - vocab_dim * 3 + vocab * 4
    assert fp32.storage["shared"]["bleu"] == fp32.bleu  # the same numbers
    assert abs(fp32.storage["shared+fp16-embed"]["bleu"] - fp32.bleu) < 1
    assert fp32.bleu > 20 and fp32.storage["shared+int8-embed"]["bleu"] > fp32.bleu - 5
    assert 0 < fp32.storage["zip"]["bytes"] < fp32.bytes_dir


def test_cli_writes_json_and_markdown(stages, tmp_path, capsys):
    _, fp32, int8 = stages
    assert main(["compress", "report", f"fp32={fp32.model_dir}", f"int8={int8.model_dir}", "--out",
                 str(tmp_path / "r"), "--no-storage"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["fp32", "int8"] and report["split"] is None
    assert report["stages"][1]["weights"]["other"] == int8.weights.other
    table = (tmp_path / "r" / "report.md").read_text()
    assert table in capsys.readouterr().out and f"({fp32.bytes_dir / int8.bytes_dir:.1f}x)" in table
    with pytest.raises(SystemExit) as refused:  # at parse time
        main(["compress", "report", fp32.model_dir, "--out", str(tmp_path / "r")])
    assert refused.value.code == 2 and "write NAME=MODEL_DIR" in capsys.readouterr().err


def test_missing_split_is_an_error(stages):
    _, fp32, _ = stages
    with pytest.raises(ReportError, match="--split nope"):
        measure_stage("fp32", fp32.model_dir, "nope", storage=False)
