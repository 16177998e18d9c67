"""Fine-grained (unstructured) magnitude pruning, gradual over a fine-tune: the masks and the schedule.

Which weights: every ``nn.Linear`` weight and every lightweight-convolution kernel, not the embedding tables
(nor the output projection tied to one) unless ``embeddings``; biases and norms never. Each weight is pruned to
the same sparsity, by its own magnitudes (torch's ``L1Unstructured``).

When (Zhu & Gupta 2017, "To prune, or not to prune"): the sparsity of update t is

    s(t) = s_f * (1 - (1 - (t - t0) / (t1 - t0)) ** 3)        t0 <= t <= t1 (0 before, s_f after)

taken every ``interval`` updates (t rounded down to t0 + k * interval), so the masks change at most (t1 - t0) /
interval + 1 times. Masks only grow: a weight once zero stays zero (``L1Unstructured`` with the old mask as the
default mask zeroes the smallest magnitudes, and the masked weights are 0, the smallest). The masks are not stored:
they are the zeros of the weights, which ``apply`` restores after every optimizer step, so a resumed fine-tune
(or any checkpoint) carries them exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils import prune
from torch import nn

from compress.errors import SparsityError


@dataclass(frozen=True)
class Schedule:
    """Gradual pruning to ``sparsity`` between updates ``begin`` and ``end``, masks updated every ``interval``."""

    sparsity: float
    begin: int = 0
    end: int = 0
    interval: int = 1

    def __post_init__(self):
        if not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise SparsityError(f"sparsity {self.sparsity!r}: must be a fraction in [0, 1) (0.8 = 80% zeros)")
        if self.begin < 0 or self.end < self.begin:
            raise SparsityError(f"sparsity schedule: need 0 <= begin ({self.begin}) <= end ({self.end})")
        if self.interval < 1:
            raise SparsityError(f"sparsity interval {self.interval}: must be >= 1 update")

    def at(self, update: int) -> float:
        """The target sparsity at ``update`` (the last schedule point at or before it)."""
        if update < self.begin:
            return 0.0
        if update >= self.end:
            return float(self.sparsity)
        t = self.begin + (update - self.begin) // self.interval * self.interval
        return float(self.sparsity) * (1 - (1 - (t - self.begin) / (self.end - self.begin)) ** 3)


def pruned_weights(model: nn.Module, embeddings: bool = False) -> dict[str, nn.Parameter]:
    """{name: weight} of the layers fine-grained pruning applies to (see the module doc), each parameter once."""
    from lite.modules.conv import LightweightConv

    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    weights, seen = {}, set()
    for name, module in model.named_modules():
        if (embeddings and isinstance(module, nn.Embedding)) or isinstance(module, (nn.Linear, LightweightConv)):
            w = module.weight
            if id(w) in seen or (id(w) in tables and not embeddings):
                continue
            seen.add(id(w))
            weights[f"{name}.weight"] = w
    return weights


class Sparsifier:
    """Holds the masks of ``model``'s pruned weights and moves them along ``schedule``."""

    def __init__(self, model: nn.Module, schedule: Schedule, embeddings: bool = False):
        self.weights = pruned_weights(model, embeddings)
        self.schedule = schedule
        self.masks = {name: w.detach() != 0 for name, w in self.weights.items()}  # zeros of a resumed run stay
        self.level = 0.0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Raise the masks to the schedule's sparsity at ``step`` (no-op until it grows), then apply them."""
        target = self.schedule.at(step)
        if target > self.level:
            for name, w in self.weights.items():
                method = prune.L1Unstructured(amount=target)
                self.masks[name] = method.compute_mask(w.detach() * self.masks[name], self.masks[name]).bool()
            self.level = target
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights (after every optimizer step: the optimizer moves them)."""
        for name, w in self.weights.items():
            w.mul_(self.masks[name])


def sparsity_report(model: nn.Module, embeddings: bool = False) -> dict:
    """Zeros of the pruned weights: overall and per weight (fraction), and how many weights there are."""
    layers = {name: (int((w == 0).sum()), w.numel()) for name, w in pruned_weights(model, embeddings).items()}
    zeros, total = sum(z for z, _ in layers.values()), sum(n for _, n in layers.values())
    return {"sparsity": zeros / total if total else 0.0, "zeros": zeros, "weights": total,
            "layers": {name: round(z / n, 6) for name, (z, n) in layers.items()}}
