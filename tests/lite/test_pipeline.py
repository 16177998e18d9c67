"""End to end on the embedded corpus: prepare -> lite train (tiny) -> lite eval / translate / fairseq-generate,
with resume, safe checkpoint loading and bad checkpoints."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lite.checkpoint import CheckpointError
from lite.data import prepare
from eval.evaluate import evaluate
from lite.train import load_config, train
from export.search import SearchOptions
from lite.checkpoint import load_model
from lite.torch_translator import TorchTranslator
from tests.conftest import BLEU_FLOOR, LITE, TINY_CONFIG, TINY_UPDATES, fairseq_generate, run


def test_trained_model_clears_the_bleu_floor_an_untrained_one_cannot(workdir, trained, tmp_path):
    result = evaluate(trained, "test", out_dir=tmp_path / "eval")
    assert result["bleu"] > BLEU_FLOOR, result
    assert result["bleu_signature"].startswith("nrefs:1|") and "|nc:6|" in result["chrf_signature"]
    assert Path(result["hypotheses"]).read_text(encoding="utf-8").count("\n") == result["sentences"]

    untrained = load_config(TINY_CONFIG, [f"data={workdir / 'data'}", f"save_dir={tmp_path / 'untrained'}",
                                          "max_update=1"])
    assert train(untrained) == 0
    assert evaluate(tmp_path / "untrained" / "checkpoint_last.pt", "test", out_dir=tmp_path / "eval0")["bleu"] < 5


def test_checkpoints_load_weights_only(trained):
    """After `import lite` torch's safe loader reads a fairseq checkpoint; without the allow-list it refuses."""
    state = torch.load(trained, weights_only=True)
    assert state["args"] is not None or state["cfg"] is not None
    plain = run([sys.executable, "-c", f"import torch; torch.load({str(trained)!r}, weights_only=True)"])
    assert plain.returncode != 0 and "argparse.Namespace" in plain.stderr


def test_training_resumes_from_the_last_checkpoint(workdir, trained, tmp_path):
    save_dir = tmp_path / "ck"
    shutil.copytree(trained.parent, save_dir)
    log = run([*LITE, "train", str(TINY_CONFIG), f"data={workdir / 'data'}", f"save_dir={save_dir}",
               f"max_update={TINY_UPDATES + 20}"])
    assert log.returncode == 0, log.stderr[-2000:]
    assert re.search(rf"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ {TINY_UPDATES} updates\)",
                     log.stdout + log.stderr)
    assert torch.load(save_dir / "checkpoint_last.pt", weights_only=True)["optimizer_history"][-1][
        "num_updates"] == TINY_UPDATES + 20


def test_fairseq_generate_with_user_dir_matches_lite_translate(workdir, trained):
    fairseq = fairseq_generate(workdir, trained)
    sources = (workdir / "data" / "raw" / "test.de").read_text(encoding="utf-8").splitlines()
    ours = TorchTranslator(trained, options=SearchOptions(beam=4)).translate(sources)
    assert len(fairseq) == len(sources)
    same = sum(fairseq[i] == ours[i] for i in range(len(sources)))
    assert same / len(sources) >= 0.99


def test_translate_cli_handles_empty_lines_and_bad_bytes(trained):
    ok = run([*LITE, "translate", "--checkpoint", str(trained)], input="Ein Hund läuft.\n\n   \nZwei Katzen.\n")
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = ok.stdout.split("\n")
    assert len(lines) == 5 and lines[1] == "" and lines[2] == "" and lines[0] and lines[3]
    bad = subprocess.run([*LITE, "translate", "--checkpoint", str(trained)], input=b"Hund\n\xff\n",
                         capture_output=True, timeout=300)
    assert bad.returncode == 0 and b"<stdin>:2: not UTF-8" in bad.stderr  # a warning; the line's output is empty
    hypotheses = bad.stdout.decode().split("\n")
    assert len(hypotheses) == 3 and hypotheses[0] and hypotheses[1] == "" == hypotheses[2]


def test_corrupt_and_mismatched_checkpoints_are_refused(workdir, trained, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(trained.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt.pt: not a loadable fairseq checkpoint"):
        load_model(corrupt)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    other = tmp_path / "other"
    prepare(workdir / "text", other, vocab_size=400)  # another dictionary
    with pytest.raises(CheckpointError, match="dictionary"):
        load_model(trained, data=other)
    cli = run([*LITE, "eval", "--checkpoint", str(corrupt), "--split", "test"])
    assert cli.returncode == 2 and "not a loadable fairseq checkpoint" in cli.stderr


def test_eval_names_the_valid_splits(trained):
    cli = run([*LITE, "eval", "--checkpoint", str(trained), "--split", "test2099"])
    assert cli.returncode == 2 and "its splits: train, valid, test" in cli.stderr


def _fairseq_children(marker: str) -> list[int]:
    """PIDs of fairseq-train processes whose command line names ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "fairseq_cli.train" in cmdline and marker in cmdline:
            pids.append(int(proc.name))
    return pids


def test_stopping_lite_train_stops_fairseq_train(workdir, tmp_path):
    import signal
    import time

    save_dir = tmp_path / "stopped"
    proc = subprocess.Popen([*LITE, "train", str(TINY_CONFIG), f"data={workdir / 'data'}", f"save_dir={save_dir}",
                             "max_update=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not _fairseq_children(str(save_dir)) and time.time() < deadline:
        time.sleep(0.5)
    assert _fairseq_children(str(save_dir)), "fairseq-train did not start"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not _fairseq_children(str(save_dir))


def test_an_unreadable_last_checkpoint_resumes_from_the_best(trained, tmp_path, caplog):
    from lite.train import _resume_args

    save_dir = tmp_path / "ck"
    save_dir.mkdir()
    (save_dir / "checkpoint_best.pt").write_bytes(trained.read_bytes())
    (save_dir / "checkpoint_last.pt").write_bytes(trained.read_bytes()[:4096])  # a kill during fairseq's copy
    assert _resume_args(save_dir, {}) == ["--restore-file", str(save_dir / "checkpoint_best.pt")]
    assert "resuming from" in caplog.text and (save_dir / "checkpoint_last.pt.unreadable").is_file()
    assert not (save_dir / "checkpoint_last.pt").exists()
    assert _resume_args(save_dir, {}) == []  # nothing left to repair
