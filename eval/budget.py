"""Budget search: the largest embed dim of a model family whose paper-protocol MACs fit a budget.

    propose_dim("lsra", 100_000_000)   # (208, 97.7M MACs): what ``lite macs --family lsra --budget 100M`` says

The families (how an embed dim becomes model args, and the step between dims) are ``lite.models.budgets.FAMILIES``;
the presets named for a budget there were sized with this search.
"""
from __future__ import annotations

from types import SimpleNamespace

from eval.macs import MacsError, paper_macs
from eval.macs_protocol import SRC_LEN, TGT_LEN
from lite.models.budgets import FAMILIES
from lite.models.factory import build, dictionary

_VOCAB_SIZE = 8  # the vocabulary does not enter the paper-protocol MACs: the smallest dictionary will do


def family_macs(family: str, dim: int, src_len: int = SRC_LEN, tgt_len: int = TGT_LEN) -> int:
    """Paper-protocol MACs of ``family`` at embed dim ``dim``."""
    args = SimpleNamespace()  # model args, filled in by the family's architecture function as fairseq does
    FAMILIES[family].build(args, dim)
    return paper_macs(build(args, dictionary(_VOCAB_SIZE)), src_len, tgt_len).total


def propose_dim(family: str, budget: int, src_len: int = SRC_LEN, tgt_len: int = TGT_LEN) -> tuple[int, int]:
    """(dim, MACs): the largest embed dim, a multiple of the family's step, whose MACs are <= ``budget``.

    Binary search; MACs grow with the dim (linear layers ~ d^2, attention ~ d).
    """
    if family not in FAMILIES:
        raise MacsError(f"--family {family!r}: valid families are {', '.join(sorted(FAMILIES))}")
    step = FAMILIES[family].multiple
    cost = {}

    def fits(k: int) -> bool:
        cost[k] = family_macs(family, k * step, src_len, tgt_len)
        return cost[k] <= budget

    if not fits(1):
        raise MacsError(f"--budget {budget:,}: even {family} at d={step} needs {cost[1]:,} MACs")
    low, high = 1, 2  # fits(low); find a high that does not fit
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step, cost[low]
