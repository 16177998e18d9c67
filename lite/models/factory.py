"""Models without a training run: a dictionary of a given size, the task stand-in fairseq builds from, presets.

    model = build_arch("transformer_d128", vocab_size=10_000)   # what `lite macs --arch` counts
    model = build(args, dictionary)                            # any lite_transformer args, e.g. a pruned checkpoint's
"""
from __future__ import annotations

import argparse

from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

from lite.errors import LiteError
from lite.models.seq2seq import LiteTransformerModel


class ModelArgsError(LiteError, ValueError):
    """An architecture name or vocabulary size that no model can be built from."""


class DictionaryTask:
    """What ``build_model`` reads of a fairseq task: its two dictionaries (one, shared, when joined)."""

    def __init__(self, source: Dictionary, target: Dictionary | None = None):
        self.source_dictionary, self.target_dictionary = source, target or source


def lite_archs() -> list[str]:
    """Every named architecture of ``lite_transformer`` (budget presets included)."""
    return sorted(a for a, m in ARCH_MODEL_REGISTRY.items() if m is LiteTransformerModel)


def dictionary(vocab_size: int) -> Dictionary:
    """A fairseq Dictionary of exactly ``vocab_size`` entries (its 4 specials included)."""
    d = Dictionary()
    if vocab_size <= d.nspecial:
        raise ModelArgsError(f"--vocab-size {vocab_size}: must exceed the {d.nspecial} special symbols")
    for i in range(vocab_size - len(d)):
        d.add_symbol(f"w{i}")
    return d


def arch_args(arch: str, **overrides) -> argparse.Namespace:
    """A registered architecture's args with its defaults filled in (``--arch NAME``), after ``overrides``."""
    archs = lite_archs()
    if arch not in archs:
        raise ModelArgsError(f"--arch {arch!r} is not a lite_transformer architecture; valid: {', '.join(archs)}")
    args = argparse.Namespace(**overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


def build(args: argparse.Namespace, source: Dictionary, target: Dictionary | None = None) -> LiteTransformerModel:
    """A ``LiteTransformerModel`` in eval mode from model args and dictionaries."""
    return LiteTransformerModel.build_model(args, DictionaryTask(source, target)).eval()


def build_arch(arch: str, vocab_size: int = 10_000) -> LiteTransformerModel:
    """A registered architecture with its defaults and a joined dictionary of ``vocab_size`` entries."""
    return build(arch_args(arch), dictionary(vocab_size))
