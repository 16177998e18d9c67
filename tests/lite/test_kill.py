"""Fault injection: ``lite data prepare``, ``lite compress quantize`` and ``lite train`` SIGKILLed at points of their
work (polled for: the staging dir made, a file written in it, the training child started). After each kill the output
dir is absent or the complete old one, never half-written; a rerun gives what an uninterrupted run gives; fairseq-train
dies with ``lite train``. ``lite export`` stages its model dir as quantize does (``export.model_dir.stage``) and is
left out: one full run costs ~20 s of CPU."""
import hashlib
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from lite.data import Corpus, prepare
from lite.text import read_lines
from tests.conftest import LITE, ROOT, TINY_CONFIG


def _staging(out: Path) -> list[Path]:
    return [p for p in out.parent.glob(f".{out.name}.*") if p.is_dir() and not p.name.endswith(".old")]


def _staged(out: Path, pattern: str):
    """A kill point: the staging dir of ``out`` holds a file matching ``pattern`` ("" for the dir itself)."""
    return lambda: any(not pattern or any(s.glob(pattern)) for s in _staging(out))


def kill_when(cmd: list[str], ready, point: str, timeout: float = 600) -> None:
    """Run ``cmd``, SIGKILL it as soon as ``ready()`` holds (polled every 5 ms); fails if it ends first. Prints the
    kill (``pytest -rP`` shows them)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"{cmd[3:5]} ended ({proc.returncode}) before {point}"
            assert time.monotonic() < deadline, f"{cmd[3:5]} did not reach {point}"
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    print(f"killed lite {' '.join(cmd[3:5])} at: {point}")


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

    def command(text, *flags):
        return [*LITE, "data", "prepare", "--from", str(text), "--out", str(out), "--vocab-size", "200", *flags]

    kill_when(command(text_a), _staged(out, ""), "staging dir made")
    assert not out.exists()
    prepare(text_a, out, vocab_size=200)  # the rerun
    assert _prepared(out) == expected_a
    for point, pattern in (("staging dir made", ""), ("spm.model written", "spm.model"),
                           ("binarizing", "train.de-en.*.bin")):
        kill_when(command(text_b, "--force"), _staged(out, pattern), point)
        assert _prepared(out) == expected_a, point  # the old corpus, whole
    prepare(text_b, out, vocab_size=200, force=True)
    assert _prepared(out) == expected_b and Corpus.load(out).fingerprint != Corpus.load(tmp_path / "ref_a").fingerprint


def _digests(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.rglob("*")) if p.is_file()}


def test_quantize_killed_leaves_no_half_model_dir(model_dir, tmp_path):
    from compress.quantize import quantize

    expected = _digests(quantize(model_dir, tmp_path / "ref"))
    out = tmp_path / "int8"
    for point, pattern in (("staging dir made", ""), ("encoder.onnx written", "encoder.onnx")):
        kill_when([*LITE, "compress", "quantize", str(model_dir), "--out", str(out)], _staged(out, pattern), point)
        assert not out.exists(), point
    assert _digests(quantize(model_dir, out)) == expected  # the rerun


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

