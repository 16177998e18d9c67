"""inc-tune: Intel Neural Compressor's accuracy-aware autotune with BLEU on held-out text, on the tiny trained LSRA.

The figures it records are checked against an independent scoring of the written model dir; a criterion no config
can meet keeps the best config of each graph, says so and exits 3 (0 with --allow-loss)."""
import json
import shutil

import onnx
import pytest
from sacrebleu.metrics import BLEU

from compress.errors import CriterionNotMet, QuantizeError
from compress.inc import CONFIGS
from compress.quantize import quantize, quantized_matmuls
from export.runtime import Translator
from lite.cli import main
from lite.text import read_lines

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter

HELDOUT = 100  # valid lines scored per trial
MAX_DROP = 2.0  # BLEU on 100 lines of a tiny model: its int8 configs land 1-2 points below fp32


@pytest.fixture(scope="module")
def fp32(trained, workdir, tmp_path_factory):
    from export.exporter import export

    root = tmp_path_factory.mktemp("inc")
    checkpoint = root / "model.pt"
    shutil.copy(trained, checkpoint)
    return export(checkpoint, root / "fp32")


def _heldout(workdir):
    raw = workdir / "data" / "raw"
    return tuple(read_lines(raw / f"valid.{lang}", HELDOUT) for lang in ("de", "en"))


def _bleu(model_dir, sources, references):
    return round(BLEU().corpus_score(Translator(model_dir).translate(sources), [references]).score, 2)


@pytest.fixture(scope="module")
def tuned(fp32):
    return quantize(fp32, fp32.parent / "tuned", method="inc-tune", eval_lines=HELDOUT, max_bleu_drop=MAX_DROP)


def test_tuned_dir_meets_the_criterion_by_an_independent_score(tuned, fp32, workdir):
    entry = json.loads((tuned / "model.json").read_text())["quantization"]
    tuning = entry["tuning"]
    sources, references = _heldout(workdir)
    print(f"inc-tune: fp32 {tuning['fp32_bleu']} -> {tuning['bleu']}; "
          + "; ".join(f"{g}: {[(t['config'], t['bleu']) for t in v['trials']]}" for g, v in tuning["graphs"].items()))
    assert tuning["heldout_lines"] == HELDOUT and tuning["fp32_bleu"] > 20  # a model that translates
    assert tuning["fp32_bleu"] == _bleu(fp32, sources, references)
    assert tuning["bleu"] == _bleu(tuned, sources, references)  # what it reports is what it wrote
    assert tuning["met"] and tuning["bleu"] >= tuning["threshold"] == round(tuning["fp32_bleu"] - MAX_DROP, 2)
    for graph, g in tuning["graphs"].items():
        names = [t["config"] for t in g["trials"]]
        assert names == list(CONFIGS[:len(names)])  # tried in order ...
        first_met = next(t for t in g["trials"] if t["bleu"] >= tuning["threshold"])
        assert g["chosen"] == first_met["config"] == names[-1]  # ... until the first that meets the criterion
        assert len(quantized_matmuls(onnx.load(str(tuned / f"{graph}.onnx")))) > 0


def test_a_criterion_no_config_meets_keeps_the_best_and_says_so(fp32, workdir):
    out = fp32.parent / "unmet"
    with pytest.raises(CriterionNotMet, match="--allow-loss"):
        quantize(fp32, out, method="inc-tune", eval_lines=HELDOUT, max_bleu_drop=-100)  # a gain of 100 BLEU
    tuning = json.loads((out / "model.json").read_text())["quantization"]["tuning"]
    assert not tuning["met"]
    for g in tuning["graphs"].values():
        assert [t["config"] for t in g["trials"]] == list(CONFIGS)  # every config tried
        assert g["bleu"] == max(t["bleu"] for t in g["trials"])  # the best kept
        assert g["chosen"] == next(t["config"] for t in g["trials"] if t["bleu"] == g["bleu"])
    assert Translator(out).translate(["Ein Hund läuft."])[0]  # the kept model works


def test_cli_exit_codes(fp32, workdir, tmp_path, capsys):
    sources, references = (tmp_path / "src.de", tmp_path / "ref.en")
    for path, lines in zip((sources, references), _heldout(workdir)):
        path.write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    common = ["compress", "quantize", str(fp32), "--method", "inc-tune", "--eval-source", str(sources),
              "--eval-reference", str(references), "--max-bleu-drop", "-100"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 3
    assert "pass --allow-loss to accept it" in capsys.readouterr().err and (tmp_path / "a" / "model.json").is_file()
    assert main([*common, "--out", str(tmp_path / "b"), "--allow-loss"]) == 0
    assert "on 20 held-out lines (criterion >= " in capsys.readouterr().out
    assert main(["compress", "quantize", str(fp32), "--method", "inc-tune", "--eval-source", str(sources),
                 "--out", str(tmp_path / "c")]) == 2
    assert "--eval-source and --eval-reference go together" in capsys.readouterr().err


def test_heldout_lines_must_pair_up(fp32, tmp_path):
    with pytest.raises(QuantizeError, match="2 source and 1 reference lines"):
        quantize(fp32, tmp_path / "q", method="inc-tune", heldout=(["a", "b"], ["c"]))
