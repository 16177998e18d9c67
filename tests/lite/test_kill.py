"""Fault injection: ``lite data prepare``, ``lite compress prune|quantize``, ``lite export`` and ``lite train``
SIGKILLed at points of their work — polled for (the staging dir made, a file written in it, a checkpoint saved, the
training child started) and at seeded random times within an uninterrupted run's duration. After each kill the
output is absent or the complete old one, never half-written, and the next run cleans what the killed one left; a
rerun gives what an uninterrupted run gives; fairseq-train dies with ``lite train``. The kills are counted in the
reliability figures printed after the test run."""
import hashlib
import random
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from lite.data import Corpus, prepare
from lite.text import read_lines
from tests.conftest import LITE, ROOT, TINY_CONFIG
from tests.figures import tally

RANDOM = random.Random(12)  # the random kill times, the same on every run


def _staging(out: Path) -> list[Path]:
    return [p for p in out.parent.glob(f".{out.name}.*") if p.is_dir() and not p.name.endswith(".old")]


def _staged(out: Path, pattern: str):
    """A kill point: the staging dir of ``out`` holds a file matching ``pattern`` ("" for the dir itself)."""
    return lambda: any(not pattern or any(s.glob(pattern)) for s in _staging(out))


def kill_when(cmd: list[str], ready: Callable[[], bool], point: str, timeout: float = 600,
              may_finish: bool = False) -> bool:
    """Run ``cmd``, SIGKILL it as soon as ``ready()`` holds (polled every 5 ms); returns whether it was killed. Ending
    first fails, unless ``may_finish`` (a random time may fall after a run that went faster). Prints the kill
    (``pytest -rP`` shows them) and counts it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                assert may_finish and proc.returncode == 0, f"{_name(cmd)} ended ({proc.returncode}) before {point}"
                print(f"{_name(cmd)} finished before: {point}")
                return False
            assert time.monotonic() < deadline, f"{_name(cmd)} did not reach {point}"
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    print(f"killed {_name(cmd)} at: {point}")
    tally(f"SIGKILLs: {_name(cmd)}")
    return True


def _name(cmd: list[str]) -> str:
    """The command a ``LITE`` argv runs: ``lite compress quantize``."""
    words = [w for w in cmd[3:6] if w.isalpha()]
    return " ".join(["lite", *words[:2]])


def after(seconds: float) -> Callable[[], bool]:
    """A kill point ``seconds`` after the first poll (made right after the process starts)."""
    start: list[float] = []

    def ready() -> bool:
        start.append(start[0] if start else time.monotonic())
        return time.monotonic() - start[0] >= seconds
    return ready


def timed(cmd: list[str]) -> float:
    """Seconds an uninterrupted run of ``cmd`` takes (it must succeed)."""
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.monotonic() - start


def random_points(seconds: float, count: int) -> list[tuple[str, Callable[[], bool]]]:
    """``count`` kill points at seeded random times within ``seconds``."""
    times = sorted(RANDOM.uniform(0.05, 0.95) * seconds for _ in range(count))
    return [(f"{t:.2f} s (random)", after(t)) for t in times]


def _prepared(data_dir: Path) -> dict[str, object]:
    """A prepared dir's content by file: bytes, and spm.model as its pieces and scores (the file records the paths
    it was trained from); fairseq's preprocess.log (paths too) left out."""
    import sentencepiece as spm

    files = {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*"))
             if p.is_file() and p.name not in ("spm.model", "preprocess.log")}
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "spm.model"))
    files["spm.model"] = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return files


def _texts(workdir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two small corpora (A, and B = A less one training pair) cut from the tiny corpus."""
    dirs = tmp_path / "a", tmp_path / "b"
    for d in dirs:
        d.mkdir()
    for split, count in (("train", 400), ("valid", 40), ("test", 40)):
        for lang in ("de", "en"):
            lines = read_lines(workdir / "text" / f"{split}.{lang}", count)
            for d, cut in zip(dirs, (0, int(split == "train"))):
                (d / f"{split}.{lang}").write_text("".join(f"{x}\n" for x in lines[:len(lines) - cut]),
                                                   encoding="utf-8")
    return dirs


def test_prepare_killed_leaves_no_half_corpus(workdir, tmp_path):
    text_a, text_b = _texts(workdir, tmp_path)
    prepare(text_a, tmp_path / "ref_a", vocab_size=200)  # uninterrupted runs
    prepare(text_b, tmp_path / "ref_b", vocab_size=200)
    expected_a, expected_b = _prepared(tmp_path / "ref_a"), _prepared(tmp_path / "ref_b")
    out = tmp_path / "data"

    def command(text, *flags, to=out):
        return [*LITE, "data", "prepare", "--from", str(text), "--out", str(to), "--vocab-size", "200", *flags]

    kill_when(command(text_a), _staged(out, ""), "staging dir made")
    assert not out.exists()
    prepare(text_a, out, vocab_size=200)  # the rerun
    assert _prepared(out) == expected_a and not _staging(out)  # the killed run's staging dir cleaned
    points = [("staging dir made", _staged(out, "")), ("spm.model written", _staged(out, "spm.model")),
              ("binarizing", _staged(out, "train.de-en.*.bin"))]
    seconds = timed(command(text_b, to=tmp_path / "timing"))
    now = expected_a
    for point, ready in points + random_points(seconds, 3):
        kill_when(command(text_b, "--force"), ready, point, may_finish="random" in point)
        # the old corpus whole, or the new one: a kill at a random time may land after the swap, before the exit
        found = _prepared(out)
        assert found in ((now, expected_b) if "random" in point else (now,)), point
        now = found
    prepare(text_b, out, vocab_size=200, force=True)
    assert _prepared(out) == expected_b and Corpus.load(out).fingerprint != Corpus.load(tmp_path / "ref_a").fingerprint
    assert not _staging(out)
    tally("reruns equal to an uninterrupted run: lite data prepare")


def _digests(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.rglob("*")) if p.is_file()}


def _kill_and_rerun(cmd: list[str], out: Path, points, expected: dict[str, str], seconds: float) -> None:
    """Kill ``cmd`` (which writes the dir ``out``, with --force) at ``points`` and ``seconds``' random ones: ``out``
    is always absent or complete; then a rerun to the end writes ``expected``, leaving no staging dir."""
    for point, ready in points + random_points(seconds, 3):
        kill_when(cmd, ready, point, may_finish="random" in point)
        assert not out.exists() or _digests(out) == expected, point
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _digests(out) == expected and not _staging(out)
    tally(f"reruns equal to an uninterrupted run: {_name(cmd)}")


def test_quantize_killed_leaves_no_half_model_dir(model_dir, tmp_path):
    def command(out):
        return [*LITE, "compress", "quantize", str(model_dir), "--out", str(out), "--force"]

    seconds = timed(command(tmp_path / "ref"))
    out = tmp_path / "int8"
    points = [("staging dir made", _staged(out, "")), ("encoder.onnx written", _staged(out, "encoder.onnx"))]
    _kill_and_rerun(command(out), out, points, _digests(tmp_path / "ref"), seconds)


def test_export_killed_leaves_no_half_model_dir(model_dir, tmp_path):
    checkpoint = model_dir.parent / "model.pt"  # the checkpoint model_dir was exported from

    def command(out):
        return [*LITE, "export", str(checkpoint), "--out", str(out), "--force"]

    seconds = timed(command(tmp_path / "ref"))
    out = tmp_path / "onnx"
    points = [("staging dir made", _staged(out, "")), ("encoder.onnx written", _staged(out, "encoder.onnx"))]
    _kill_and_rerun(command(out), out, points, _digests(tmp_path / "ref"), seconds)


def _pruned(out: Path) -> tuple[dict, dict]:
    """A pruned dir's report (less the path it names) and weights."""
    import json

    import torch

    report = json.loads((out / "prune.json").read_text())
    del report["checkpoint"]
    state = torch.load(out / "checkpoint_pruned.pt", map_location="cpu", weights_only=False)["model"]
    return report, {k: v.tolist() for k, v in state.items()}


def test_prune_killed_leaves_no_half_dir(model_dir, tmp_path):
    checkpoint = model_dir.parent / "model.pt"

    def command(out):
        return [*LITE, "compress", "prune", str(checkpoint), "--budget", "1100k", "--out", str(out), "--force"]

    seconds = timed(command(tmp_path / "ref"))
    expected, out = _pruned(tmp_path / "ref"), tmp_path / "pruned"
    for point, ready in [("staging dir made", _staged(out, ""))] + random_points(seconds, 1):
        kill_when(command(out), ready, point, may_finish="random" in point)
        assert not out.exists() or _pruned(out) == expected, point
    assert subprocess.run(command(out), cwd=ROOT, capture_output=True, timeout=900).returncode == 0
    assert _pruned(out) == expected and not _staging(out)
    tally("reruns equal to an uninterrupted run: lite compress prune")


def test_train_killed_after_a_checkpoint_resumes_to_the_same_model(workdir, tmp_path):
    import torch

    def command(save_dir):
        return [*LITE, "train", str(TINY_CONFIG), f"data={workdir / 'data'}", f"save_dir={save_dir}",
                "max_update=20", "save_interval_updates=10"]

    timed(command(tmp_path / "ref"))
    out = tmp_path / "ck"
    kill_when(command(out), lambda: (out / "checkpoint_last.pt").exists(), "checkpoint_last.pt written")
    resumed = subprocess.run(command(out), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "loaded checkpoint" in resumed.stdout.lower()  # it resumed, not started afresh

    def weights(save_dir):
        state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
        assert state["optimizer_history"][-1]["num_updates"] == 20
        return state["model"]
    for name, tensor in weights(tmp_path / "ref").items():
        torch.testing.assert_close(weights(out)[name], tensor, rtol=0, atol=0, msg=name)
    tally("reruns equal to an uninterrupted run: lite train")


def test_killed_train_takes_fairseq_train_with_it(workdir, tmp_path):
    cmd = [*LITE, "train", str(TINY_CONFIG), f"data={workdir / 'data'}", f"save_dir={tmp_path / 'ck'}",
           "max_update=100000"]  # would run for hours: it must die with lite train, not finish

    def fairseq_started():
        try:
            return any("fairseq_cli.train" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children())
        except psutil.Error:  # a process that just ended
            return False

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not fairseq_started():
            assert proc.poll() is None and time.monotonic() < deadline, "fairseq-train never started"
            time.sleep(0.05)
        (child,) = psutil.Process(proc.pid).children()
    finally:
        proc.kill()
        proc.wait()
    print("killed lite train at: fairseq-train started")
    tally("SIGKILLs: lite train")
    deadline = time.monotonic() + 120
    while _alive(child):
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("fairseq-train outlived a SIGKILLed `lite train`")
        time.sleep(0.05)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

