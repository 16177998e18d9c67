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
# Layout (this doc is `lite compress prune --help`): sites.py, where (one adapter per prunable sublayer,
# find_sites); budget.py, how much (kinds, importance, the step loop, prune_to_budget); checkpoint.py, the files
# (prune_checkpoint, verification). The command line is lite/cli/compress.py.
# The names below load their module (torch, torch-pruning, fairseq: seconds) on first use, so that `lite`
# builds its parser without them.
from __future__ import annotations

import importlib

from compress.errors import PruneError

CHECKPOINT_NAME = "checkpoint_pruned.pt"
REPORT_NAME = "prune.json"
IMPORTANCES = ("magnitude", "taylor")

_MODULES = {
    "sites": ("MIXER_SITES", "AttentionSite", "ConvSite", "FfnSite", "GauSite", "Site", "find_sites"),
    "budget": ("Batches", "PruneConfig", "PruneResult", "accumulate_gradients", "choose_kinds", "dims",
               "importance_scorer", "kind_args", "missing_args", "model_options", "prune_kind", "prune_site",
               "prune_to_budget", "smallest_macs"),
    "checkpoint": ("ATOL", "prune_checkpoint", "pruned_state", "train_batches",
                   "verify_state"),
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}

__all__ = ["PruneError", "CHECKPOINT_NAME", "REPORT_NAME", "IMPORTANCES", *_MODULE_OF]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
