"""Pruning a model in memory down to a MAC budget: which kinds, how units are ranked, the step loop.

Units are ranked within each layer by torch-pruning's group importance (``GroupMagnitudeImportance``, L2, or
``GroupTaylorImportance``, |w dL/dw| from a few batches), summed over the unit's channels; every layer of a kind
keeps the same number, its own best. Step t keeps round(n0 x (1 - step)^t) units of every kind (at least one);
MACs (``eval.macs.paper_macs``) are measured after each step until they are <= the budget.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compress.errors import PruneError
from compress.prune import IMPORTANCES
from compress.prune.sites import Site, find_sites
from eval.macs import count_params, paper_macs

logger = logging.getLogger(__name__)

Batches = Callable[[], Iterable[dict]]  # each call yields fairseq samples: {"net_input": {...}, "target": B x T}


@dataclass(frozen=True)
class PruneConfig:
    """What ``prune_to_budget`` does."""

    budget: int  # MACs, paper protocol (30 + 30 tokens, embeddings and output projection excluded)
    importance: str = "magnitude"  # "magnitude" (L2 of the unit's weights) | "taylor" (|w dL/dw|, needs batches)
    step: float = 0.05  # fraction of the remaining units removed per step
    kinds: tuple[str, ...] | None = None  # model args to prune; None: every kind the model's args can describe
    taylor_batches: int = 8  # batches of the training split for the gradients of --importance taylor
    max_tokens: int = 2048  # tokens per such batch

    def __post_init__(self):
        if self.budget <= 0:
            raise PruneError(f"--budget {self.budget}: must be positive, e.g. 60M")
        if self.importance not in IMPORTANCES:
            raise PruneError(f"--importance {self.importance!r}: valid: {', '.join(IMPORTANCES)}")
        if not 0 < self.step < 1:
            raise PruneError(f"--step {self.step}: a fraction of the remaining units, in (0, 1), e.g. 0.05")
        if self.taylor_batches < 1 or self.max_tokens < 1:
            raise PruneError(f"--taylor-batches ({self.taylor_batches}) and --max-tokens ({self.max_tokens}) "
                             f"must be >= 1")


# ---------------------------------------------------------------------------------------------- describing

class _ArgNames:
    """Stands in for the parser ``add_args`` fills: records the attribute name of every option it adds."""

    def __init__(self):
        self.names: set[str] = set()

    def add_argument(self, *flags: str, dest: str | None = None, **_) -> None:
        self.names.add(dest or flags[0].lstrip("-").replace("-", "_"))


def model_options() -> set[str]:
    """The args ``lite_transformer`` knows (its ``add_args``), as attribute names."""
    from lite.models import LiteTransformerModel

    recorder = _ArgNames()
    LiteTransformerModel.add_args(recorder)
    return recorder.names


def kind_args(kind: str) -> tuple[str, ...]:
    """The model args that must exist for a pruned kind to be rebuilt from its checkpoint."""
    if kind.endswith("_attention_heads"):
        return kind, kind.replace("_heads", "_head_dim")
    if kind == "conv_heads":
        return kind, "conv_head_dim"
    return (kind,)


def missing_args(kind: str, options: set[str]) -> list[str]:
    """The flags of ``kind_args(kind)`` that are not among ``options``."""
    return [f"--{arg.replace('_', '-')}" for arg in kind_args(kind) if arg not in options]


def dims(sites: dict[str, list[Site]]) -> dict[str, int]:
    """Every kind's width, read off the weights (one value per arg; layers of a kind must agree)."""
    out: dict[str, int] = {}
    for kind, group in sites.items():
        values = [site.values(kind) for site in group]
        if any(v != values[0] for v in values):
            raise PruneError(f"{kind}: layers differ ({', '.join(f'{s.name}: {v}' for s, v in zip(group, values))}); "
                             f"pruning needs every layer of a kind at the same width")
        out.update(values[0])
    return out


def choose_kinds(sites: dict[str, list[Site]], blocked: dict[str, str], kinds: Iterable[str] | None,
                 options: set[str]) -> tuple[list[str], dict[str, str]]:
    """(kinds to prune, kind -> why skipped). Named kinds must exist and be prunable; by default every kind whose
    result the model's args can describe."""
    if kinds is not None:
        chosen = list(dict.fromkeys(kinds))
        for kind in chosen:
            if kind in blocked:
                raise PruneError(f"--kinds {kind}: cannot be pruned: {blocked[kind]}")
            if kind not in sites:
                raise PruneError(f"--kinds {kind}: this model has no such layers; its kinds: "
                                 f"{', '.join(sorted(sites))}")
        return chosen, {}
    chosen, skipped = [], {}
    for kind in sorted(sites):
        missing = missing_args(kind, options)
        if kind in blocked:
            skipped[kind] = blocked[kind]
        elif missing:
            skipped[kind] = (f"lite_transformer has no {' / '.join(missing)} arg, so a checkpoint with pruned "
                             f"{kind} could not be rebuilt from its args")
        else:
            chosen.append(kind)
    return chosen, skipped


# ---------------------------------------------------------------------------------------------- pruning

def importance_scorer(name: str) -> tp.importance.Importance:
    """torch-pruning's group importance, raw (no normalisation: only the ranking within a layer matters)."""
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
    raise PruneError(f"--importance {name!r}: valid: {', '.join(IMPORTANCES)}")


def _graph(site: Site) -> tp.DependencyGraph:
    module, inputs, customized = site.coupling()
    with torch.enable_grad():  # the graph is traced through autograd
        return tp.DependencyGraph().build_dependency(module, inputs, customized_pruners=customized, verbose=False)


def prune_site(site: Site, keep: int, scorer: tp.importance.Importance) -> list[int]:
    """Keep the ``keep`` most important units of one sublayer; returns their indices among its current units."""
    units, size = site.units(), site.unit_size
    if keep >= units:
        return list(range(units))
    graph = _graph(site)
    channels = list(range(units * size))
    scores = scorer(graph.get_pruning_group(site.root, tp.prune_linear_out_channels, channels))
    if scores is None:
        raise PruneError(f"{site.name}: torch-pruning found no weights to score in its group")
    per_unit = scores[:units * size].view(units, size).sum(1)  # [units]
    kept = sorted(torch.argsort(per_unit, descending=True, stable=True)[:keep].tolist())
    dropped = [c for u in range(units) if u not in kept for c in range(u * size, (u + 1) * size)]
    graph.get_pruning_group(site.root, tp.prune_linear_out_channels, dropped).prune()
    site.finish()
    return kept


def prune_kind(sites: list[Site], keep: int, scorer: tp.importance.Importance) -> dict[str, list[int]]:
    """Every layer of a kind keeps ``keep`` units, each its own best: site name -> kept unit indices."""
    return {site.name: prune_site(site, keep, scorer) for site in sites}


def accumulate_gradients(model: nn.Module, batches: Batches) -> None:
    """dL/dw of the summed token NLL over the batches, in eval mode (no dropout): what Taylor importance reads."""
    model.zero_grad(set_to_none=True)
    count = 0
    with torch.enable_grad():
        for sample in batches():
            logits, _ = model(**sample["net_input"])  # [B, T, V]
            lprobs = F.log_softmax(logits.float(), dim=-1)
            loss = F.nll_loss(lprobs.view(-1, lprobs.size(-1)), sample["target"].view(-1),
                              ignore_index=model.decoder.dictionary.pad(), reduction="sum")
            loss.backward()
            count += 1
    if count == 0:
        raise PruneError("--importance taylor: the batches yielded nothing (is the training split empty?)")


def _target(n0: int, step: float, t: int) -> int:
    return max(1, int(n0 * (1 - step) ** t + 0.5))


@dataclass
class PruneResult:
    """What ``prune_to_budget`` did; the body of prune.json."""

    budget: int
    importance: str
    step: float
    kinds: list[str]
    skipped_kinds: dict[str, str]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    params_no_embed_before: int
    params_no_embed_after: int
    dims_before: dict[str, int]
    dims_after: dict[str, int]
    steps: list[dict] = field(default_factory=list)  # {"step", "units": {kind: n}, "macs"}

    @property
    def pruned_dims(self) -> dict[str, int]:
        """The args of every kind that was pruned, a head count with its head dim (what the checkpoint's args and
        a fine-tuning run must carry)."""
        return {arg: self.dims_after[arg] for kind in self.kinds if self.dims_after[kind] != self.dims_before[kind]
                for arg in kind_args(kind)}


def smallest_macs(model: nn.Module, kinds: list[str]) -> int:
    """MACs with every layer of the given kinds at one unit (on a copy; the model is not touched)."""
    small = copy.deepcopy(model)
    sites, _ = find_sites(small)
    scorer = importance_scorer("magnitude")
    for kind in kinds:
        prune_kind(sites[kind], 1, scorer)
    return paper_macs(small).total


def prune_to_budget(model: nn.Module, config: PruneConfig, batches: Batches | None = None) -> PruneResult:
    """Prune ``model`` in place, a step at a time, until its paper-protocol MACs are <= ``config.budget``.

    ``batches`` (for ``importance="taylor"``): a callable yielding fairseq samples. ``model.args`` gets the new dims.
    Raises PruneError before touching the model when the budget is out of reach.
    """
    if config.importance == "taylor" and batches is None:
        raise PruneError("--importance taylor needs batches of training data for its gradients")
    sites, blocked = find_sites(model)
    kinds, skipped = choose_kinds(sites, blocked, config.kinds, model_options())
    for kind, reason in skipped.items():
        logger.warning(f"not pruning {kind}: {reason}")
    if not kinds:
        raise PruneError(f"nothing this model's args can describe is prunable: "
                         f"{'; '.join(f'{k}: {r}' for k, r in skipped.items()) or 'no prunable layers'}")
    training = model.training
    model.eval()
    try:
        dims_before, macs = dims(sites), paper_macs(model).total
        params, params_no_embed = count_params(model)
        result = PruneResult(budget=config.budget, importance=config.importance, step=config.step, kinds=kinds,
                             skipped_kinds=skipped, macs_before=macs, macs_after=macs, params_before=params,
                             params_after=params, params_no_embed_before=params_no_embed,
                             params_no_embed_after=params_no_embed, dims_before=dims_before, dims_after=dims_before)
        if macs <= config.budget:
            logger.info(f"{macs:,} MACs already within the budget of {config.budget:,}: nothing pruned")
            return result
        floor = smallest_macs(model, kinds)
        if floor > config.budget:
            raise PruneError(f"--budget {config.budget:,} MACs is out of reach: the smallest reachable is {floor:,} "
                             f"MACs (every layer of {', '.join(kinds)} at one unit), the model has {macs:,}")
        scorer = importance_scorer(config.importance)
        n0 = {kind: sites[kind][0].units() for kind in kinds}
        current, t = dict(n0), 0
        while macs > config.budget:
            if all(n == 1 for n in current.values()):  # cannot happen after the floor check
                raise PruneError(f"--budget {config.budget:,}: every kind at one unit and still {macs:,} MACs")
            t += 1
            target = {kind: min(current[kind], _target(n0[kind], config.step, t)) for kind in kinds}
            if target == current:
                continue
            if config.importance == "taylor":
                accumulate_gradients(model, batches)
            for kind in kinds:
                if target[kind] < current[kind]:
                    prune_kind(sites[kind], target[kind], scorer)
            model.zero_grad(set_to_none=True)
            current, macs = target, paper_macs(model).total
            result.steps.append({"step": len(result.steps) + 1, "units": dict(current), "macs": macs})
            logger.info(f"step {len(result.steps)}: {', '.join(f'{k} {v}' for k, v in current.items())} -> "
                        f"{macs:,} MACs (budget {config.budget:,})")
        result.macs_after, result.dims_after = macs, dims(sites)
        result.params_after, result.params_no_embed_after = count_params(model)
        model.args = copy.copy(model.args)
        for arg, value in result.pruned_dims.items():
            setattr(model.args, arg, value)
        return result
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
