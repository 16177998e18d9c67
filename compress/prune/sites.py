"""Where a model is pruned: one ``Site`` per sublayer whose inner width shrinks, found by ``find_sites``.

A site knows its root layer (whose output channels are the units'), the channels per unit, a *coupling forward*
for torch-pruning's trace (the sublayer's own projections wired so that the trace shows which channels belong
together) and the attribute fix-ups after pruning. Which mixer gets which site is ``MIXER_SITES``; a mixer not
listed there blocks the heads arg it takes its heads from (Fastformer). Adding a prunable mechanism: a ``Site``
subclass here, its line in ``MIXER_SITES``, its case in tests/compress/test_prune.py.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch_pruning as tp
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from compress.errors import PruneError
from lite.modules import GAU, LSRA, ConvBranch, DynamicConv, LightweightConv, SelfAttention
from lite.modules.attention import set_heads


class Site:
    """One sublayer whose inner width is pruned (see the module doc)."""

    unit_size = 1  # channels of the root's output per unit

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


class FfnSite(Site):
    """FeedForward: unit i = fc1 row i, fc2 column i. Its own forward shows that coupling."""

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


class AttentionSite(Site):
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


class GauSite(Site):
    """GAU: unit = channel i of U and V (rows i and E + i of proj), column i of out_proj."""

    @property
    def root(self) -> nn.Linear:
        return self.module.proj

    def units(self) -> int:
        return self.module.hidden_dim

    def coupling(self):
        return _GauCoupling(self.module), (torch.randn(1, self.module.embed_dim),), {}

    def finish(self) -> None:
        self.module.hidden_dim = self.module.out_proj.in_features


# ---------------------------------------------------------------------------------------------- conv heads

def _prune_lightweight_heads(conv: LightweightConv, heads: list[int], channels: list[int]) -> None:
    """Rows of the H x K kernel."""
    keep = [h for h in range(conv.num_heads) if h not in heads]
    conv.weight = nn.Parameter(conv.weight.data[keep].clone())  # [H', K]


def _prune_dynamic_heads(conv: DynamicConv, heads: list[int], channels: list[int]) -> None:
    """The heads' K rows of ``weight_linear`` (C -> H*K keeps its H x K layout) and the channels' input columns."""
    k = conv.kernel_size
    tp.prune_linear_out_channels(conv.weight_linear, [h * k + j for h in heads for j in range(k)])
    tp.prune_linear_in_channels(conv.weight_linear, channels)


# convolution type -> removes the given heads (and their channels) from its weights; the bias and counts are common
CONV_HEAD_PRUNERS: dict[type, Callable[[nn.Module, list[int], list[int]], None]] = {
    LightweightConv: _prune_lightweight_heads,
    DynamicConv: _prune_dynamic_heads,
}


def _conv_head_pruner(conv: nn.Module) -> Callable | None:
    return next((f for t, f in CONV_HEAD_PRUNERS.items() if isinstance(conv, t)), None)


class _ConvStandIn(nn.Module):
    """A depthwise convolution in a coupling trace: channel c in, channel c out. Traced for real, its window of
    shifted slices and concatenations would reach torch-pruning as unrelated elementwise and concat ops."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return x * 1.0


class DepthwiseConvPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's handler for a LightweightConv/DynamicConv (behind ``_ConvStandIn``): removes whole heads
    (``CONV_HEAD_PRUNERS``). Channels in = channels out (depthwise)."""

    def prune_out_channels(self, layer: _ConvStandIn, idxs) -> nn.Module:
        conv = layer.conv
        size = conv.channels // conv.num_heads
        heads = sorted({i // size for i in idxs})
        if sorted(idxs) != [h * size + r for h in heads for r in range(size)]:
            raise PruneError(f"{type(conv).__name__}: channels {sorted(idxs)} are not whole heads of {size}")
        keep_channels = [c for c in range(conv.channels) if c // size not in heads]
        _conv_head_pruner(conv)(conv, heads, sorted(idxs))
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias.data[keep_channels].clone())
        conv.channels, conv.num_heads = len(keep_channels), conv.num_heads - len(heads)
        return layer

    prune_in_channels = prune_out_channels  # depthwise: the same channels in and out

    def get_out_channels(self, layer: _ConvStandIn) -> int:
        return layer.conv.channels

    get_in_channels = get_out_channels


class _ConvBranchCoupling(nn.Module):
    """linear1 -> (GLU, written as chunk + sigmoid so the trace maps both halves) -> conv stand-in -> linear2."""

    def __init__(self, branch: ConvBranch):
        super().__init__()
        self.linear1, self.linear2, self.glu = branch.linear1, branch.linear2, branch.glu
        self.conv = _ConvStandIn(branch.conv)

    def forward(self, x: Tensor) -> Tensor:  # [1, C] -> [1, C]
        h = self.linear1(x)
        if self.glu:
            a, b = h.chunk(2, dim=1)
            h = a * torch.sigmoid(b)
        return self.linear2(self.conv(h))


class ConvSite(Site):
    """ConvBranch (LSRA's short-range half, or the conv mixer): unit = conv head of R channels."""

    def __init__(self, name: str, module: ConvBranch):
        super().__init__(name, module)
        if _conv_head_pruner(module.conv) is None:
            raise PruneError(f"{name}.conv: {type(module.conv).__name__} is not a convolution pruning knows")
        self.unit_size = module.conv.channels // module.conv.num_heads

    @property
    def root(self) -> nn.Linear:
        return self.module.linear1

    def units(self) -> int:
        return self.module.conv.num_heads

    def coupling(self):
        return (_ConvBranchCoupling(self.module), (torch.randn(1, self.root.in_features),),
                {_ConvStandIn: DepthwiseConvPruner()})

    def values(self, kind: str) -> dict[str, int]:
        return {kind: self.units(), "conv_head_dim": self.unit_size}


# ---------------------------------------------------------------------------------------------- finding them

# mixer type -> (the kind it is pruned as, given the heads arg of its side; its site, from (name, mixer))
MIXER_SITES: dict[type, tuple[Callable[[str], str], Callable[[str, nn.Module], Site]]] = {
    SelfAttention: (lambda heads: heads, lambda name, m: AttentionSite(f"{name}.attn", m.attn)),
    ConvBranch: (lambda heads: "conv_heads", ConvSite),
    GAU: (lambda heads: "gau_hidden_dim", GauSite),
}


def _mixer_parts(mixer: nn.Module) -> list[tuple[str, nn.Module]]:
    """LSRA is two mixers side by side, each pruned on its own."""
    if isinstance(mixer, LSRA):
        return [("mixer.attention", mixer.attention), ("mixer.conv", mixer.conv)]
    return [("mixer", mixer)]


def find_sites(model: nn.Module) -> tuple[dict[str, list[Site]], dict[str, str]]:
    """(kind -> its sites, kind -> why it cannot be pruned), kinds named after the model arg that sets them."""
    args = model.args
    sites: dict[str, list[Site]] = {}
    blocked: dict[str, str] = {}
    for side in ("encoder", "decoder"):
        heads = "mixer_attention_heads" if getattr(args, "mixer_attention_heads", None) else f"{side}_attention_heads"
        for i, layer in enumerate(getattr(model, side).layers):
            path = f"{side}.layers.{i}"
            if layer.ffn is not None:
                sites.setdefault(f"{side}_ffn_embed_dim", []).append(FfnSite(f"{path}.ffn", layer.ffn))
            for sub, module in _mixer_parts(layer.mixer):
                rule = next((r for t, r in MIXER_SITES.items() if isinstance(module, t)), None)
                if rule is None:  # e.g. Fastformer: its heads come from the same arg, and it is not pruned
                    blocked[heads] = (f"{path}.{sub} ({type(module).__name__}) also takes its heads from "
                                      f"--{heads.replace('_', '-')} and is not pruned")
                    continue
                kind, site = rule
                sites.setdefault(kind(heads), []).append(site(f"{path}.{sub}", module))
            if side == "decoder":
                sites.setdefault("decoder_attention_heads", []).append(
                    AttentionSite(f"{path}.cross_attention", layer.cross_attention))
    return sites, blocked
