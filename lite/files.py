"""Atomic writes, in one place: a reader never sees a half-written file or dir, and a kill loses nothing.

Files are written to a temp name beside the target and renamed over it (``os.replace`` is atomic on one file
system). A dir is staged beside its target; replacing an existing one renames the old aside, moves the new in,
then deletes the old, so a kill at any point leaves either the old or the new dir in place (or the old one aside,
restored by the next ``replace_dir``). Torch-free: the ONNX runtime uses it too.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from lite.errors import LiteError


class OutputError(LiteError, ValueError):
    """An output path that the toolkit will not write: not its own, or taken."""


def write_text(path: str | Path, text: str) -> None:
    """``path`` holds ``text`` (UTF-8) or its old content, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_bytes(path: str | Path, data: bytes) -> None:
    """``path`` holds ``data`` or its old content, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_lines(path: str | Path, lines: Iterable[str]) -> None:
    write_text(path, "".join(line + "\n" for line in lines))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def _aside(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def replace_dir(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``; an existing ``out`` is renamed aside first and deleted last."""
    old = _aside(out)
    if old.exists() and not out.exists():  # a kill between the two renames of an earlier replace
        os.replace(old, out)
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out: Path, marker: str, force: bool, what: str) -> None:
    """Refuse an ``out`` that is taken: a dir not written by the toolkit (no ``marker`` file) unless empty, or one of
    ours without ``force``."""
    if not out.exists():
        if _aside(out).exists():  # a kill during an earlier replace: that dir is ours to restore
            os.replace(_aside(out), out)
        else:
            return
    if not out.is_dir():
        raise OutputError(f"{out} is a file, not a dir; choose another --out")
    if not (out / marker).is_file():
        if any(out.iterdir()):
            raise OutputError(f"{out} exists and is not a {what} (no {marker}); choose another --out")
        return
    if not force:
        raise OutputError(f"{out} already holds a {what}; pass --force to replace it")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock (``.<name>.lock`` beside it) for the block: a second writer of ``out`` is refused with one
    line instead of interleaving its writes. The kernel drops the lock when its holder dies, even by SIGKILL; the
    holder deletes the file when done (a newcomer that opened the deleted file sees it is gone and opens anew)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_name(f".{out.name}.lock")
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise OutputError(f"{out} is being written by another process (pid {holder}); wait for it to end or "
                              f"choose another output") from None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # the file was deleted by the holder we waited on: lock the new one
    try:
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        os.unlink(path)  # while still held: see the docstring
        f.close()


def _remove_stale_staging(out: Path) -> None:
    """Staging dirs of ``out`` left by a killed writer (safe: the caller holds ``out``'s lock)."""
    for stale in out.parent.glob(f".{out.name}.*"):
        if stale.is_dir() and stale != _aside(out):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def staged_dir(out: Path, marker: str, force: bool, what: str) -> Iterator[Path]:
    """A temp dir beside ``out`` to fill; moved to ``out`` when the block ends, removed if it raises.

    The block must write ``marker`` into the staging dir (it says the dir is the toolkit's to replace). ``out`` is
    locked meanwhile; staging dirs that a killed writer left are removed."""
    out = Path(out)
    with locked(out):
        check_out_dir(out, marker, force, what)
        _remove_stale_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            yield staging
            if not (staging / marker).is_file():
                raise OutputError(f"internal: {what} staged without its {marker}")
            replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
