"""Presets sized to a compute budget: the largest model of a family whose Mult-Adds fit the budget.

A budget is counted with the Lite Transformer paper's protocol (``eval/macs.py``): 30 source + 30 target
tokens, full teacher-forced decoder pass, token embeddings and output projection excluded. Every preset
named ``<family>_<budget>`` must land in [0.9 x budget, budget]; ``tests/test_macs.py`` walks the registry.
The dims below are what ``lite macs --family <family> --budget <budget>`` proposes.

Later families add themselves to ``FAMILIES`` (how a dim becomes a preset) and ``BUDGET_PRESETS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fairseq.models import register_model_architecture

from lite.models.architectures import MODEL, _lsra_wmt, _transformer

M = 1_000_000


@dataclass(frozen=True)
class Family:
    """How to fill ``args`` for a member of the family at embed dim ``dim``; dims step by ``multiple``."""

    build: Callable[[object, int], None]
    multiple: int  # every dim must divide by the heads: LSRA 2 x 4 (half per branch, 4 heads) and 8 cross heads
    description: str


FAMILIES: dict[str, Family] = {
    "lsra": Family(lambda args, dim: _lsra_wmt(args, dim, dropout=0.1, attention_dropout=0.08), 8,
                   "LSRA, WMT style: dynamic conv + GLU, FFN = embed, 6+6 layers"),
    "transformer": Family(_transformer, 8, "Transformer: FFN = 4 x embed, 4 heads below d=256 and 8 from it, 6+6"),
}

# family -> {budget in MACs -> arch}
BUDGET_PRESETS: dict[str, dict[int, str]] = {
    "lsra": {100 * M: "lsra_100m", 500 * M: "lsra_500m"},
    "transformer": {100 * M: "transformer_100m", 500 * M: "transformer_500m"},
}


@register_model_architecture(MODEL, "lsra_100m")
def lsra_100m(args):  # d=208: 97.7M MACs; dropout of lsra_wmt_200
    _lsra_wmt(args, 208, dropout=0.04, attention_dropout=0.03)


@register_model_architecture(MODEL, "lsra_500m")
def lsra_500m(args):  # d=480: 495.8M MACs; dropout of lsra_wmt_496
    _lsra_wmt(args, 480, dropout=0.1, attention_dropout=0.08)


@register_model_architecture(MODEL, "transformer_100m")
def transformer_100m(args):  # d=136 (4 heads): 97.6M MACs
    _transformer(args, 136)


@register_model_architecture(MODEL, "transformer_500m")
def transformer_500m(args):  # d=304 (8 heads): 475.6M MACs (d=312: 500.7M)
    _transformer(args, 304)
