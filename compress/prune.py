"""Structured pruning of ``lite_transformer`` models down to a MAC budget, with torch-pruning: ``lite compress prune``.

    lite compress prune runs/x/checkpoints/checkpoint_best.pt --budget 60M --out runs/x/pruned \\
        [--importance magnitude|taylor] [--step 0.05] [--kinds encoder_ffn_embed_dim,decoder_ffn_embed_dim]
    lite train CONFIG data=... save_dir=... --finetune-from runs/x/pruned/checkpoint_pruned.pt  # dims from its args

What is pruned: inner widths only (the residual/embedding width stays). Each *kind* of width is named after the
model arg that describes it and stays uniform across the layers that arg covers, so that the pruned model is
again a ``lite_transformer`` built from its args:

    kind (model arg)              unit (what one unit removes)
    encoder_ffn_embed_dim,        FFN hidden unit: a row of fc1, a column of fc2
      decoder_ffn_embed_dim
    encoder_attention_heads,      attention head: head_dim rows of q_proj, k_proj, v_proj, head_dim columns of
      decoder_attention_heads,      out_proj, in every MHA that takes its heads from that arg (mixer attention,
      mixer_attention_heads         cross attention); needs *_attention_head_dim as well
    gau_hidden_dim                GAU channel: rows i and E + i (U and V) of proj, column i of out_proj
    conv_heads                    conv head (R channels): rows of linear1 (both GLU halves), the head's kernel
                                    (lightweight: its row of H x K; dynamic: its K rows of weight_linear, and the
                                    R input columns), columns of linear2; needs conv_head_dim as well

A kind is pruned by default when lite_transformer has the args that describe its result (``kind_args``): the FFN
dims; heads with --{encoder,decoder,mixer}-attention-head-dim (heads x head dim need not equal the width), the GAU
width with --gau-hidden-dim, conv heads with --conv-head-dim. A kind whose args the model lacks is skipped (listed
in prune.json) unless named in ``PruneConfig.kinds`` for in-memory use. A kind is unavailable when its arg also
feeds a module that is not pruned (Fastformer takes its heads from the attention-heads arg).

How torch-pruning is used: for each pruned sublayer a ``tp.DependencyGraph`` is traced on a *coupling forward*, the
sublayer's own projections wired so that the trace shows which channels belong together (FFN: its real forward;
attention: out_proj(q * k * v); GAU: out_proj(u * v) from proj's split; conv branch: linear1 -> GLU as chunk ->
conv -> linear2, the convolution a stand-in with a customized ``BasePruningFunc`` that removes whole heads). The
real forwards cannot be traced usefully: torch-pruning treats reshape/transpose/bmm (attention, GAU) and the
convolution's shifted-slice window as elementwise ops and couples the inner channels to the residual stream.
Units are ranked within each layer by torch-pruning's group importance (``GroupMagnitudeImportance``, L2, or
``GroupTaylorImportance``, |w dL/dw| from a few batches), summed over the unit's channels; every layer of a kind
keeps the same number, its own best. ``group.prune()`` then removes the rest from every coupled layer.

Iterative: step t keeps round(n0 x (1 - step)^t) units of every kind (at least one), so each step removes ``step``
of the remaining units; MACs (``eval.macs.paper_macs``, the paper's protocol) are measured after each step until
they are <= the budget, so the result lands within one step below it. A budget below the model with one unit per
layer of every pruned kind is refused before anything is pruned.

Output: ``checkpoint_pruned.pt``, the input checkpoint with the pruned weights and args carrying the new dims (its
optimizer state dropped, training time reset), verified before writing by rebuilding the model from those args and
comparing outputs (1e-5); ``prune.json`` beside it (MACs, params and dims before/after, steps, skipped kinds). Both
written atomically.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from eval.macs import count_params, paper_macs
from lite.modules import GAU, LSRA, ConvBranch, DynamicConv, FeedForward, LightweightConv, SelfAttention
from lite.modules.attention import set_heads

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint_pruned.pt"
REPORT_NAME = "prune.json"
IMPORTANCES = ("magnitude", "taylor")
ATOL = 1e-5  # the rebuilt model must reproduce the pruned one to this

Batches = Callable[[], Iterable[dict]]  # each call yields fairseq samples: {"net_input": {...}, "target": B x T}


class PruneError(ValueError):
    """A model, budget or option that cannot be pruned as asked; the message names the option and the fix."""


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


# ---------------------------------------------------------------------------------------------- sites

class _Site:
    """One sublayer whose inner width is pruned: its root layer (whose output channels are the units'), the channels
    per unit, a coupling forward for torch-pruning's trace, and the attribute fix-ups after pruning."""

    unit_size = 1

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    @property
    def root(self) -> nn.Linear:
        raise NotImplementedError

    def units(self) -> int:
        return self.root.out_features // self.unit_size

    def coupling(self) -> tuple[nn.Module, tuple, dict]:
        """(module to trace, example inputs, torch-pruning customized pruners)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Update the module's attributes to its pruned weights."""

    def values(self, kind: str) -> dict[str, int]:
        """The model args (and values) that describe this site's width."""
        return {kind: self.units()}


class _FfnSite(_Site):
    """FeedForward: unit i = fc1 row i, fc2 column i. Its own forward shows that coupling."""

    def __init__(self, name: str, module: FeedForward):
        super().__init__(name, module)

    @property
    def root(self) -> nn.Linear:
        return self.module.fc1

    def coupling(self):
        return self.module, (torch.randn(1, self.root.in_features),), {}


class _AttentionCoupling(nn.Module):
    """out_proj(q * k * v): channel c of q, k and v meets channel c of out_proj's input, as within a head."""

    def __init__(self, attn: MultiheadAttention):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj

    def forward(self, query: Tensor, key: Tensor) -> Tensor:  # [1, C_q], [1, C_kv] -> [1, C]
        return self.out_proj(self.q_proj(query) * self.k_proj(key) * self.v_proj(key))


class _AttentionSite(_Site):
    """fairseq MultiheadAttention with separate q/k/v projections: unit = head of head_dim channels."""

    def __init__(self, name: str, module: MultiheadAttention):
        super().__init__(name, module)
        if module.bias_k is not None or module.add_zero_attn:
            raise PruneError(f"{name}: attention with add_bias_kv/add_zero_attn is not supported by pruning")
        self.unit_size = module.head_dim

    @property
    def root(self) -> nn.Linear:
        return self.module.q_proj

    def coupling(self):
        inputs = (torch.randn(1, self.module.q_proj.in_features), torch.randn(1, self.module.k_proj.in_features))
        return _AttentionCoupling(self.module), inputs, {}

    def finish(self) -> None:
        # the state a model built with --*-attention-head-dim has: heads x head_dim inner width, no fused kernel
        attn = self.module
        set_heads(attn, attn.q_proj.out_features // attn.head_dim, attn.head_dim)

    def values(self, kind: str) -> dict[str, int]:
        return {kind: self.units(), kind.replace("_heads", "_head_dim"): self.unit_size}


class _GauCoupling(nn.Module):
    """out_proj(u * v), u and v split from proj as in GAU._project: unit i = rows i and E + i of proj, column i."""

    def __init__(self, gau: GAU):
        super().__init__()
        self.proj, self.out_proj = gau.proj, gau.out_proj
        self.sizes = [gau.hidden_dim, gau.hidden_dim, gau.key_dim]

    def forward(self, x: Tensor) -> Tensor:  # [1, C] -> [1, C]
        u, v, _ = self.proj(x).split(self.sizes, dim=1)  # dim 1: torch-pruning maps split indices on it
        return self.out_proj(u * v)


class _GauSite(_Site):
    @property
    def root(self) -> nn.Linear:
        return self.module.proj

    def units(self) -> int:
        return self.module.hidden_dim

    def coupling(self):
        return _GauCoupling(self.module), (torch.randn(1, self.module.embed_dim),), {}

    def finish(self) -> None:
        self.module.hidden_dim = self.module.out_proj.in_features


class _ConvStandIn(nn.Module):
    """A depthwise convolution in a coupling trace: channel c in, channel c out. Traced for real, its window of
    shifted slices and concatenations would reach torch-pruning as unrelated elementwise and concat ops."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return x * 1.0


class _DepthwiseConvPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's handler for a LightweightConv/DynamicConv (behind ``_ConvStandIn``): removes whole heads.

    Lightweight: rows of the H x K kernel. Dynamic: the head's K rows of ``weight_linear`` (C -> H*K keeps its
    H x K layout) and the removed channels' input columns. Channels in = channels out (depthwise).
    """

    def prune_out_channels(self, layer: _ConvStandIn, idxs) -> nn.Module:
        conv = layer.conv
        size = conv.channels // conv.num_heads
        heads = sorted({i // size for i in idxs})
        if sorted(idxs) != [h * size + r for h in heads for r in range(size)]:
            raise PruneError(f"{type(conv).__name__}: channels {sorted(idxs)} are not whole heads of {size}")
        keep_heads = [h for h in range(conv.num_heads) if h not in heads]
        keep_channels = [c for c in range(conv.channels) if c // size not in heads]
        if isinstance(conv, LightweightConv):
            conv.weight = nn.Parameter(conv.weight.data[keep_heads].clone())  # [H', K]
        else:
            k = conv.kernel_size
            tp.prune_linear_out_channels(conv.weight_linear, [h * k + j for h in heads for j in range(k)])
            tp.prune_linear_in_channels(conv.weight_linear, sorted(idxs))
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias.data[keep_channels].clone())
        conv.channels, conv.num_heads = len(keep_channels), len(keep_heads)
        return layer

    prune_in_channels = prune_out_channels  # depthwise: the same channels in and out

    def get_out_channels(self, layer: _ConvStandIn) -> int:
        return layer.conv.channels

    get_in_channels = get_out_channels


class _ConvBranchCoupling(nn.Module):
    """linear1 -> (GLU, written as chunk + sigmoid so the trace maps both halves) -> conv stand-in -> linear2."""

    def __init__(self, branch: ConvBranch):
        super().__init__()
        self.linear1, self.conv, self.linear2, self.glu = branch.linear1, _ConvStandIn(branch.conv), branch.linear2, \
            branch.glu

    def forward(self, x: Tensor) -> Tensor:  # [1, C] -> [1, C]
        h = self.linear1(x)
        if self.glu:
            a, b = h.chunk(2, dim=1)
            h = a * torch.sigmoid(b)
        return self.linear2(self.conv(h))


class _ConvSite(_Site):
    """ConvBranch (LSRA's short-range half, or the conv mixer): unit = conv head of R channels."""

    def __init__(self, name: str, module: ConvBranch):
        super().__init__(name, module)
        if not isinstance(module.conv, (LightweightConv, DynamicConv)):
            raise PruneError(f"{name}.conv: {type(module.conv).__name__} is not a convolution pruning knows")
        self.unit_size = module.conv.channels // module.conv.num_heads

    @property
    def root(self) -> nn.Linear:
        return self.module.linear1

    def units(self) -> int:
        return self.module.conv.num_heads

    def coupling(self):
        return (_ConvBranchCoupling(self.module), (torch.randn(1, self.root.in_features),),
                {_ConvStandIn: _DepthwiseConvPruner()})

    def values(self, kind: str) -> dict[str, int]:
        return {kind: self.units(), "conv_head_dim": self.unit_size}


def find_sites(model: nn.Module) -> tuple[dict[str, list[_Site]], dict[str, str]]:
    """(kind -> its sites, kind -> why it cannot be pruned), kinds named after the model arg that sets them."""
    args = model.args
    sites: dict[str, list[_Site]] = {}
    blocked: dict[str, str] = {}
    for side in ("encoder", "decoder"):
        heads = "mixer_attention_heads" if getattr(args, "mixer_attention_heads", None) else f"{side}_attention_heads"
        for i, layer in enumerate(getattr(model, side).layers):
            path = f"{side}.layers.{i}"
            if layer.ffn is not None:
                sites.setdefault(f"{side}_ffn_embed_dim", []).append(_FfnSite(f"{path}.ffn", layer.ffn))
            mixer = layer.mixer
            parts = [("mixer.attention", mixer.attention), ("mixer.conv", mixer.conv)] if isinstance(mixer, LSRA) \
                else [("mixer", mixer)]
            for sub, module in parts:
                if isinstance(module, SelfAttention):
                    sites.setdefault(heads, []).append(_AttentionSite(f"{path}.{sub}.attn", module.attn))
                elif isinstance(module, ConvBranch):
                    sites.setdefault("conv_heads", []).append(_ConvSite(f"{path}.{sub}", module))
                elif isinstance(module, GAU):
                    sites.setdefault("gau_hidden_dim", []).append(_GauSite(f"{path}.{sub}", module))
                else:  # e.g. Fastformer: its heads come from the same arg, and it is not pruned
                    blocked[heads] = (f"{path}.{sub} ({type(module).__name__}) also takes its heads from "
                                      f"--{heads.replace('_', '-')} and is not pruned")
            if side == "decoder":
                sites.setdefault("decoder_attention_heads", []).append(
                    _AttentionSite(f"{path}.cross_attention", layer.cross_attention))
    return sites, blocked


# ---------------------------------------------------------------------------------------------- describing

def model_options() -> set[str]:
    """The args ``lite_transformer`` knows (its ``add_args``), as attribute names."""
    from lite.models import LiteTransformerModel

    parser = argparse.ArgumentParser(add_help=False)
    LiteTransformerModel.add_args(parser)
    return {action.dest for action in parser._actions}


def kind_args(kind: str) -> tuple[str, ...]:
    """The model args that must exist for a pruned kind to be rebuilt from its checkpoint."""
    if kind.endswith("_attention_heads"):
        return kind, kind.replace("_heads", "_head_dim")
    if kind == "conv_heads":
        return kind, "conv_head_dim"
    return (kind,)


def _missing_args(kind: str, options: set[str]) -> list[str]:
    return [f"--{arg.replace('_', '-')}" for arg in kind_args(kind) if arg not in options]


def dims(sites: dict[str, list[_Site]]) -> dict[str, int]:
    """Every kind's width, read off the weights (one value per arg; layers of a kind must agree)."""
    out: dict[str, int] = {}
    for kind, group in sites.items():
        values = [site.values(kind) for site in group]
        if any(v != values[0] for v in values):
            raise PruneError(f"{kind}: layers differ ({', '.join(f'{s.name}: {v}' for s, v in zip(group, values))}); "
                             f"pruning needs every layer of a kind at the same width")
        out.update(values[0])
    return out


def choose_kinds(sites: dict[str, list[_Site]], blocked: dict[str, str], kinds: Iterable[str] | None,
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
        missing = _missing_args(kind, options)
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


def _graph(site: _Site) -> tp.DependencyGraph:
    module, inputs, customized = site.coupling()
    with torch.enable_grad():  # the graph is traced through autograd
        return tp.DependencyGraph().build_dependency(module, inputs, customized_pruners=customized, verbose=False)


def prune_site(site: _Site, keep: int, scorer: tp.importance.Importance) -> list[int]:
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


def prune_kind(sites: list[_Site], keep: int, scorer: tp.importance.Importance) -> dict[str, list[int]]:
    """Every layer of a kind keeps ``keep`` units, each its own best: site name -> kept unit indices."""
    return {site.name: prune_site(site, keep, scorer) for site in sites}


def _accumulate_gradients(model: nn.Module, batches: Batches) -> None:
    """dL/dw of the summed token NLL over the batches, in eval mode (no dropout)."""
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
                _accumulate_gradients(model, batches)
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


# ---------------------------------------------------------------------------------------------- checkpoints

class _Dictionaries:
    def __init__(self, model: nn.Module):
        self.source_dictionary, self.target_dictionary = model.encoder.dictionary, model.decoder.dictionary


def _model_args(state: dict) -> argparse.Namespace:
    return state["args"] if state.get("args") is not None else state["cfg"]["model"]


def read_state(checkpoint: str | Path, data: str | Path | None = None) -> dict:
    """The checkpoint's dict as stored (plain containers and an argparse.Namespace, as fairseq's save_state writes
    it; fairseq's load_checkpoint_to_cpu would turn ``cfg`` into an OmegaConf object that the weights-only loader
    refuses), with ``data`` as its data dir if given."""
    import lite  # noqa: F401  (allows the Namespace in weights-only loading)

    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if data:
        for args in (state.get("args"), (state.get("cfg") or {}).get("model")):
            if args is not None:
                args.data = str(data)
        if (state.get("cfg") or {}).get("task") is not None:
            state["cfg"]["task"]["data"] = str(data)
    return state


def pruned_state(state: dict, model: nn.Module, result: PruneResult) -> dict:
    """The input checkpoint's dict with the pruned weights and dims; optimizer state dropped (its shapes are the
    old ones), training time and best-so-far reset (they describe the unpruned model)."""
    new = copy.deepcopy({k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")})
    new["model"] = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    for args in (new.get("args"), (new.get("cfg") or {}).get("model")):
        if args is not None:
            for arg, value in result.pruned_dims.items():
                setattr(args, arg, value)
    extra = {k: v for k, v in (new.get("extra_state") or {}).items() if k not in ("best", "val_loss")}
    extra["previous_training_time"] = 0.0
    extra["pruned_dims"] = result.pruned_dims
    new["extra_state"] = extra
    return new


def _example(model: nn.Module, batch: int = 2, src_len: int = 9, tgt_len: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    d = model.decoder.dictionary
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(d.nspecial, len(d), (batch, src_len), generator=generator)
    src[:, -1] = d.eos()
    prev = torch.randint(d.nspecial, len(d), (batch, tgt_len), generator=generator)
    prev[:, 0] = d.eos()
    return src, torch.full((batch,), src_len), prev


def verify_state(state: dict, model: nn.Module) -> float:
    """Rebuild the model from the state's args (as fairseq does on loading), load its weights strictly and compare
    logits with ``model``; returns the max difference. PruneError on a shape mismatch or a difference > ATOL."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    from lite.models import LiteTransformerModel

    args = copy.deepcopy(_model_args(state))
    if getattr(args, "arch", None) in ARCH_CONFIG_REGISTRY:
        ARCH_CONFIG_REGISTRY[args.arch](args)
    rebuilt = LiteTransformerModel.build_model(args, _Dictionaries(model)).eval()
    expected = rebuilt.state_dict()
    wrong = [f"{name}: weights {tuple(t.shape)}, args build {tuple(expected[name].shape)}"
             for name, t in state["model"].items() if name in expected and expected[name].shape != t.shape]
    if wrong:
        pruned = (state.get("extra_state") or {}).get("pruned_dims") or {}
        missing = [f"--{arg.replace('_', '-')}" for arg in pruned if arg not in model_options()]
        raise PruneError(f"the pruned checkpoint's args do not describe its weights ({'; '.join(wrong[:3])})"
                         + (f": lite_transformer has no {' / '.join(missing)} arg" if missing else ""))
    rebuilt.load_state_dict(state["model"], strict=True)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = _example(model)
            diff = (rebuilt(*inputs)[0] - model(*inputs)[0]).abs().max().item()
    finally:
        model.train(training)
    if not diff <= ATOL:
        raise PruneError(f"the model rebuilt from the pruned checkpoint differs from the pruned model by {diff:.3g} "
                         f"(tolerance {ATOL})")
    return diff


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def train_batches(task, model: nn.Module, count: int, max_tokens: int, seed: int = 1) -> Batches:
    """``count`` batches of the task's training split (a seeded shuffle), read once and reused at every step."""
    from fairseq import utils

    task.load_dataset("train")
    iterator = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=max_tokens, seed=seed, ignore_invalid_inputs=True,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
    ).next_epoch_itr(shuffle=True)
    samples = [sample for _, sample in zip(range(count), iterator)]
    return lambda: iter(samples)


def finetune_overrides(checkpoint: str | Path) -> list[str]:
    """``key=value`` overrides for ``lite train`` that rebuild a pruned checkpoint's dims (empty if not pruned)."""
    import lite  # noqa: F401  (registers the safe globals fairseq checkpoints need)

    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    return [f"{k}={v}" for k, v in ((state.get("extra_state") or {}).get("pruned_dims") or {}).items()]


def prune_checkpoint(checkpoint: str | Path, out_dir: str | Path, config: PruneConfig, data: str | Path | None = None,
                     force: bool = False) -> tuple[nn.Module, dict]:
    """Load -> prune to the budget -> verify -> write ``out_dir/checkpoint_pruned.pt`` and ``prune.json``.

    Returns the pruned model and the report (prune.json's content).
    """
    from fairseq import checkpoint_utils

    from lite.translate import load_checkpoint

    out_dir = Path(out_dir)
    target = out_dir / CHECKPOINT_NAME
    if target.exists() and not force:
        raise PruneError(f"{target} exists; pass --force to replace it")
    model, task = load_checkpoint(checkpoint, data)
    if config.kinds is not None:  # named kinds must be describable too: the checkpoint is rebuilt from its args
        options = model_options()
        missing = {kind: _missing_args(kind, options) for kind in config.kinds}
        missing = {kind: args for kind, args in missing.items() if args}
        if missing:
            raise PruneError("; ".join(f"--kinds {kind}: lite_transformer has no {' / '.join(args)} arg, so the "
                                       f"pruned checkpoint could not be rebuilt" for kind, args in missing.items()))
    batches = train_batches(task, model, config.taylor_batches, config.max_tokens) \
        if config.importance == "taylor" else None
    state = read_state(checkpoint, data)
    result = prune_to_budget(model, config, batches)
    new = pruned_state(state, model, result)
    verify_state(new, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_utils.torch_persistent_save(new, str(target))  # writes <target>.tmp, then renames
    report = {"source": str(checkpoint), "checkpoint": str(target), **asdict(result),
              "finetune_overrides": [f"{k}={v}" for k, v in result.pruned_dims.items()],
              "torch_pruning": getattr(tp, "__version__", "unknown")}
    _write_json(out_dir / REPORT_NAME, report)
    return model, report


# ---------------------------------------------------------------------------------------------- CLI

def _prune(args: argparse.Namespace) -> int:
    from eval.macs import MacsError, parse_budget
    from lite.checkpoint import CheckpointError

    try:
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip()) if args.kinds else None
        config = PruneConfig(parse_budget(args.budget), args.importance, args.step, kinds, args.taylor_batches,
                             args.max_tokens)
        _, report = prune_checkpoint(args.checkpoint, args.out, config, data=args.data, force=args.force)
    except (PruneError, MacsError, CheckpointError) as e:
        print(f"lite compress prune: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['checkpoint']}: {report['macs_before'] / 1e6:.2f}M -> {report['macs_after'] / 1e6:.2f}M MACs "
          f"(budget {report['budget'] / 1e6:.2f}M) in {len(report['steps'])} steps, params without embeddings "
          f"{report['params_no_embed_before']:,} -> {report['params_no_embed_after']:,}")
    for arg in report["dims_after"]:
        before, after = report["dims_before"][arg], report["dims_after"][arg]
        print(f"  {arg}: {before}" + (f" -> {after}" if after != before else " (kept)"))
    for kind, reason in report["skipped_kinds"].items():
        print(f"  not pruned: {kind}: {reason}")
    print(f"fine-tune: lite train CONFIG data=... save_dir=... --finetune-from {report['checkpoint']} "
          f"(the pruned dims come from the checkpoint)")
    return 0


def add_prune_parser(actions) -> argparse.ArgumentParser:
    """Add the ``prune`` action to ``lite compress``'s subparsers."""
    p = actions.add_parser("prune", help="structured pruning (torch-pruning) down to a MAC budget",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq checkpoint of a lite_transformer (.pt)")
    p.add_argument("--budget", required=True, help="MACs, paper protocol, e.g. 60M or 0.5G")
    p.add_argument("--out", required=True, help=f"dir for {CHECKPOINT_NAME} and {REPORT_NAME}")
    p.add_argument("--importance", choices=IMPORTANCES, default="magnitude",
                   help="unit ranking: L2 magnitude, or first-order Taylor on training batches (default: %(default)s)")
    p.add_argument("--step", type=float, default=0.05, help="fraction of the remaining units per step "
                                                            "(default: %(default)s)")
    p.add_argument("--kinds", help="comma-separated model args to prune (default: every kind the model's args can "
                                   "describe), e.g. encoder_ffn_embed_dim,decoder_ffn_embed_dim")
    p.add_argument("--data", help="the checkpoint's prepared data dir, when not where it was trained")
    p.add_argument("--taylor-batches", type=int, default=8, help="training batches for --importance taylor")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per such batch")
    p.add_argument("--force", action="store_true", help=f"replace an existing {CHECKPOINT_NAME}")
    p.add_argument("--json", action="store_true", help="print prune.json's content")
    p.set_defaults(func=_prune)
    return p


def register_cli(subparsers):
    """Add ``lite compress`` (with its ``prune`` action) to ``lite``'s subparsers; returns the compress actions'
    subparsers, for other compress actions (quantize, report) to add themselves. Handlers: ``args.func(args) -> exit
    code``."""
    compress = subparsers.add_parser("compress", help="pruning to a budget, quantization, size report")
    actions = compress.add_subparsers(dest="action", required=True)
    add_prune_parser(actions)
    return actions
