"""FLASH-Quad, FLASH, Fastformer and the survey's mechanisms (Linear Transformer, Performer, local attention, dense and
random Synthesizer, Linformer, memory-compressed, strided, Longformer, BigBird, routing, Sinkhorn and Poolingformer
attention, Reformer's LSH attention, the Set Transformer's ISAB) learn the embedded corpus: a tiny model of each
clears a BLEU floor that an untrained model cannot reach (tests/test_pipeline.py shows the untrained one scores below
5); the survey's mechanisms also decode on the ONNX Runtime translator exactly as in torch."""
from pathlib import Path

import pytest

from eval.evaluate import evaluate
from lite.train import load_config, train
from tests.conftest import ROOT

# measured (600 updates): FLASH-Quad 62, FLASH 82, Fastformer 79, Linear 78, Performer 80, local 85,
# Synthesizer dense 70, random 78, Linformer 85, memory-compressed 86, strided 88, Longformer 86, BigBird 87,
# ISAB 82, routing 69, Sinkhorn 88, Poolingformer 91, Reformer 74 (4 buckets, 2 rounds, chunks of 4)
FAMILY_FLOOR = 30.0
# the Efficient Transformers survey's mechanisms
SURVEY = ["linear", "performer", "local", "synthesizer_dense", "synthesizer_random", "linformer", "memory_compressed",
          "strided", "longformer", "bigbird", "isab", "routing", "sinkhorn", "poolingformer", "reformer"]
TRAINED = ["flash_quad", "flash", "fastformer", *SURVEY]  # families whose tiny model is trained here


@pytest.mark.parametrize("family", TRAINED)
def test_tiny_model_clears_the_bleu_floor(family, workdir, tmp_path):
    """...and a survey mechanism's model decodes on the ONNX Runtime translator exactly as in torch."""
    config = load_config(ROOT / "configs" / "models" / family / "tiny.yaml",
                         [f"data={workdir / 'data'}", f"save_dir={tmp_path / family}"])
    assert train(config) == 0
    checkpoint = tmp_path / family / "checkpoint_best.pt"
    torch_result = evaluate(checkpoint, "test", out_dir=tmp_path / "torch")
    print(f"{family}: BLEU {torch_result['bleu']}")
    assert torch_result["bleu"] > FAMILY_FLOOR, torch_result
    if family in SURVEY:
        from export.exporter import export

        onnx_result = evaluate(export(checkpoint, tmp_path / "onnx"), "test", backend="onnx",
                               out_dir=tmp_path / "onnx_eval")
        assert Path(onnx_result["hypotheses"]).read_text() == Path(torch_result["hypotheses"]).read_text()
