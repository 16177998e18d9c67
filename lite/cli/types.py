"""Argument types that validate at parse time: a bad value is one argparse error line (exit 2), never a traceback."""
from __future__ import annotations

import argparse
import re

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number > 0")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number >= 0")
    return value


def open_fraction(text: str) -> float:
    """A fraction in (0, 1)."""
    return _fraction(text, lambda v: 0 < v < 1, "a fraction in (0, 1), e.g. 0.05")


def sparsity(text: str) -> float:
    """A fraction of zeros in [0, 1)."""
    return _fraction(text, lambda v: 0 <= v < 1, "a sparsity is a fraction of zeros in [0, 1), e.g. 0.8")


def share(text: str) -> float:
    """A share in (0, 1]."""
    return _fraction(text, lambda v: 0 < v <= 1, "a share in (0, 1], e.g. 0.75")


def _fraction(text: str, valid, what: str) -> float:
    value = _number(text, float)
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
    return value


def budget(text: str) -> int:
    """MACs: ``60M``, ``0.5G``, ``500000000``; > 0."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: not a MAC count; write e.g. 100M, 0.5G or 100000000")
    value = int(round(float(match[1]) * _SUFFIX[match[2].upper()]))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a budget must be > 0")
    return value


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not {'an integer' if kind is int else 'a number'}") from None
