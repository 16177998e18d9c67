"""FLASH-Quad, FLASH and Fastformer learn the embedded corpus: a tiny model of each clears a BLEU floor that an
untrained model cannot reach (tests/test_pipeline.py shows the untrained one scores below 5)."""
import pytest

from eval.evaluate import evaluate
from lite.train import load_config, train
from tests.conftest import ROOT

FAMILY_FLOOR = 30.0  # measured: FLASH-Quad 62, FLASH 82, Fastformer 79 (600 updates)


@pytest.mark.parametrize("family", ["flash_quad", "flash", "fastformer"])
def test_tiny_model_clears_the_bleu_floor(family, workdir):
    config = load_config(ROOT / "configs" / "models" / family / "tiny.yaml",
                         [f"data={workdir / 'data'}", f"save_dir={workdir / family}"])
    assert train(config) == 0
    result = evaluate(workdir / family / "checkpoint_best.pt", "test", out_dir=workdir / f"eval_{family}")
    print(f"{family}: BLEU {result['bleu']}")
    assert result["bleu"] > FAMILY_FLOOR, result
