"""One line reader for every text input (corpora, sources, references, calibration text, stdin).

A line ends at ``\\n`` only (one trailing ``\\r`` is dropped, for files written on Windows). Other characters that
``str.splitlines`` would break on (``\\r`` inside a line, ``\\x0b``, ``\\x0c``, ``\\x1c``-``\\x1e``, ``\\x85``,
U+2028, U+2029) stay inside the line as text, so line N of a source stays aligned with line N of its reference.
Torch-free.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

from lite.errors import LiteError

logger = logging.getLogger(__name__)


# What str.splitlines (\r also universal newlines, so fairseq-preprocess) breaks a line on, besides \n
BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_SPACES = str.maketrans(dict.fromkeys(BREAKS, " "))


class TextError(LiteError, ValueError):
    """A text input that cannot be read: missing, or not UTF-8 (the message names the file and line)."""


def decode_line(raw: bytes, name: str, number: int) -> str:
    """One raw line (its ``\\n`` included or not) -> text without the line end; TextError naming ``name:number``."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{name}:{number}: not UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None


def read_stream(stream: BinaryIO, name: str, limit: int | None = None, keep_going: bool = False) -> list[str]:
    """The lines of a binary stream (at most ``limit``). ``keep_going``: a line that is not UTF-8 is read as an empty
    line, with a warning naming it, so the lines after it keep their numbers (``lite translate``)."""
    lines = []
    for number, raw in enumerate(stream, start=1):
        if limit is not None and number > limit:
            break
        try:
            lines.append(decode_line(raw, name, number))
        except TextError as e:
            if not keep_going:
                raise
            logger.warning(f"{e}; read as an empty line")
            lines.append("")
    return lines


def read_lines(path: str | Path, limit: int | None = None) -> list[str]:
    """The lines of a UTF-8 file (at most ``limit``); TextError when it is missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise TextError(f"{path}: no such file")
    with open(path, "rb") as f:
        return read_stream(f, str(path), limit)


def one_line(text: str) -> str:
    """``text`` with every character of ``BREAKS`` replaced by a space: one line for any reader."""
    return text.translate(_SPACES)
