"""Atomic outputs (``lite.files``): a second writer of a dir is refused with one line, a killed writer's staging dir
is cleaned by the next, a dir renamed aside by a killed replace is restored, and a save dir in training is locked."""
import os

import pytest

from lite.files import OutputError, locked, staged_dir
from lite.train import load_config, train
from tests.conftest import TINY_CONFIG


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "out"
    with locked(out):
        with pytest.raises(OutputError, match=rf"{out} is being written by another process \(pid {os.getpid()}\)"):
            with staged_dir(out, "done", force=False, what="dir"):
                pass
    with staged_dir(out, "done", force=False, what="dir") as staging:  # released: the next writer goes on
        (staging / "done").write_text("1")
    assert (out / "done").read_text() == "1"


def test_a_killed_writers_leftovers_are_cleaned_or_restored(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.k1ll3d"  # a staging dir (tempfile's name) whose writer was SIGKILLed
    stale.mkdir()
    (stale / "half").write_text("x")
    aside = tmp_path / ".out.old"  # a replace killed between its two renames: the old dir is aside
    aside.mkdir()
    (aside / "done").write_text("old")
    with pytest.raises(OutputError, match="--force"):  # the old dir is back in place, and ours
        with staged_dir(out, "done", force=False, what="dir"):
            pass
    assert (out / "done").read_text() == "old" and not aside.exists()
    with staged_dir(out, "done", force=True, what="dir") as staging:
        assert not stale.exists()
        (staging / "done").write_text("new")
    assert (out / "done").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging dir or lock file left


def test_a_save_dir_in_training_is_locked(workdir, tmp_path):
    save_dir = tmp_path / "ck"
    config = load_config(TINY_CONFIG, [f"data={workdir / 'data'}", f"save_dir={save_dir}"])
    with locked(save_dir):
        with pytest.raises(OutputError, match="is being written by another process"):
            train(config)
    assert not any(save_dir.iterdir())
