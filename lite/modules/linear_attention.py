"""Linear Transformer attention (Katharopoulos et al., 2020, "Transformers are RNNs: Fast Autoregressive Transformers
with Linear Attention"), pure torch, encoder and causal decoder form.

Notation: T time, B batch, C channels, H heads of D = C / H channels; phi a positive feature map of M features:
elu(x) + 1 here (M = D), FAVOR+'s random features in ``performer.py`` (the same attention with another phi).

    q, k, v = X W_q, X W_k, X W_v                              [B, T, C] -> heads [B, H, T, D]
    encoder:  out_i = phi(q_i) S / (phi(q_i) . z + eps)         S = sum_j phi(k_j) v_j^T  [M, D],  z = sum_j phi(k_j)  [M]
    decoder:  the same with S_i, z_i summed over j <= i only    (prefix sums)
    out = W_o (heads concatenated)

Softmax attention's exp(q . k) is replaced by the kernel phi(q) . phi(k), so the sum over keys factors through S
and z: O(T M D) per head instead of O(T^2 D), and a decoding step only adds phi(k_t) v_t^T to S and phi(k_t) to z —
an RNN whose state, S [B, H, M, D] and z [B, H, M], does not grow with the sentence. eps = 1e-6 as in the authors'
fast-transformers library.

The full causal pass (training) takes blocks of L = 64 frames: within a block the masked weights phi(q_i) . phi(k_j)
(L x L), across blocks S and z of the blocks before — the chunked form of Hua et al. 2022 (FLASH) and of
performer-pytorch. Prefix sums frame by frame would write a [T, M, D] tensor a head: a training step 3.6x slower
for the Performer, 2x for the Linear Transformer, at translation lengths (one block below 64 frames).

Padding: phi(k) and v are zeroed at pads, so pads add nothing to any sum; outputs at pads are zero.

Incremental state (one frame per call), batch first so beams reorder on dim 0: ``kv`` [B, H, M, D], ``k_sum``
[B, H, M].
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState, StateSlot, reorder_batch_first

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

STATE_NAMES = ("kv", "k_sum")
EPS = 1e-6
BLOCK = 64  # frames of one block of the full causal pass


def causal_sums(q: Tensor, k: Tensor, v: Tensor, block: int = BLOCK) -> Tuple[Tensor, Tensor]:
    """phi(q_i) S_i [B, T, H, D] and phi(q_i) . z_i [B, T, H], S_i and z_i summed over j <= i, from phi(q), phi(k)
    [B, T, H, M] and v [B, T, H, D]; in blocks of ``block`` frames (the last padded with frames of zeros)."""
    batch, length, heads, _ = q.shape
    blocks = -(-length // block)
    size = min(block, length)
    extra = blocks * size - length
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, extra)).view(batch, blocks, size, heads, -1) for t in (q, k, v))
    weights = torch.einsum("bnihm,bnjhm->bnhij", q, k).tril()  # [B, N, H, L, L], j <= i within a block
    out = torch.einsum("bnhij,bnjhd->bnihd", weights, v)  # [B, N, L, H, D]
    norm = weights.sum(-1).transpose(2, 3)  # [B, N, L, H]
    if blocks > 1:  # the blocks before: S and z of each block, summed over the earlier ones
        kv = F.pad(torch.einsum("bnjhm,bnjhd->bnhmd", k[:, :-1], v[:, :-1]), (0, 0, 0, 0, 0, 0, 1, 0))
        z = F.pad(k[:, :-1].sum(2), (0, 0, 0, 0, 1, 0))  # [B, N, H, M]
        out = out + torch.einsum("bnihm,bnhmd->bnihd", q, kv.cumsum(1))
        norm = norm + torch.einsum("bnihm,bnhm->bnih", q, z.cumsum(1))
    return out.flatten(1, 2)[:, :length], norm.flatten(1, 2)[:, :length]


def feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1: positive, so every kernel value phi(q) . phi(k) is a weight."""
    return F.elu(x) + 1


class EluFeatures(nn.Module):
    """The Linear Transformer's feature map, M = D features."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.dim = head_dim

    def forward(self, x: Tensor, is_query: bool) -> Tensor:
        return feature_map(x)


@with_incremental_state
class LinearAttention(nn.Module):
    """Multi-head linear attention; causal (prefix sums) in the decoder.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool, features: Optional[nn.Module] = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"linear attention: embed dim {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim, self.num_heads, self.head_dim, self.causal = embed_dim, num_heads, embed_dim // num_heads, causal
        # phi: [..., D] -> [..., M] (``is_query`` lets a map stabilize queries alone); elu + 1 unless given
        self.features = features if features is not None else EluFeatures(self.head_dim)
        self.block = BLOCK  # frames of a block of the full causal pass
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        for linear in (self.qkv, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _project(self, x: Tensor, pad: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x [..., C], pad [...] (True at pads) -> phi(q), phi(k) [..., H, M], v [..., H, D]; phi(k), v zero at pads
        (masked, not multiplied: a product then summed would count as MACs)."""
        q, k, v = (t.view(*t.shape[:-1], self.num_heads, self.head_dim) for t in self.qkv(x).chunk(3, dim=-1))
        pad = pad[..., None, None]
        return self.features(q, True), self.features(k, False).masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            if not self.causal:
                raise ValueError("linear attention: incremental_state is only for the causal (decoder) unit")
            steps = [self._step(x[t], None if padding_mask is None else padding_mask[:, t], incremental_state)
                     for t in range(x.size(0))]
            return torch.stack(steps)  # [T, B, C]
        x = x.transpose(0, 1)  # [B, T, C]
        pad = padding_mask if padding_mask is not None else x.new_zeros(x.shape[:2], dtype=torch.bool)  # [B, T]
        q, k, v = self._project(x, pad)  # [B, T, H, M] x 2, [B, T, H, D]
        if self.causal:  # S_i, z_i over j <= i
            out, norm = causal_sums(q, k, v, self.block)  # [B, T, H, D], [B, T, H]
        else:
            kv = torch.einsum("bthd,bthe->bhde", k, v)  # [B, H, M, D]
            out = torch.einsum("bthd,bhde->bthe", q, kv)
            norm = torch.einsum("bthd,bhd->bth", q, k.sum(1))
        out = out / (norm.unsqueeze(-1) + EPS)
        out = self.out_proj(out.flatten(2)).masked_fill(pad.unsqueeze(-1), 0.0)  # [B, T, C]
        return out.transpose(0, 1)  # [T, B, C]

    # ---------------------------------------------------------------- one decoding step

    def initial_state(self, batch: int, like: Tensor) -> Dict[StateSlot, Tensor]:
        """The fresh state ``_state`` builds for itself, for ``batch`` rows."""
        return {(name, None): t for name, t in self._state({}, like.new_zeros(batch, self.embed_dim)).items()}

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        state = {name: self.get_incremental_state(incremental_state, name) for name in STATE_NAMES}
        if state["kv"] is None:
            batch = x.size(0)
            state = {"kv": x.new_zeros(batch, self.num_heads, self.features.dim, self.head_dim),
                     "k_sum": x.new_zeros(batch, self.num_heads, self.features.dim)}
        return state

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]; adds the frame to the running sums."""
        state = self._state(incremental_state, x)
        pad = padding_mask if padding_mask is not None else x.new_zeros(x.size(0), dtype=torch.bool)  # [B]
        q, k, v = self._project(x, pad)  # [B, H, M] x 2, [B, H, D]
        kv = state["kv"] + torch.einsum("bhd,bhe->bhde", k, v)  # [B, H, M, D]; an einsum, as counted in the full pass
        k_sum = state["k_sum"] + k  # [B, H, M]
        self.set_incremental_state(incremental_state, "kv", kv)
        self.set_incremental_state(incremental_state, "k_sum", k_sum)
        out = torch.einsum("bhd,bhde->bhe", q, kv) / (torch.einsum("bhd,bhd->bh", q, k_sum).unsqueeze(-1) + EPS)
        return self.out_proj(out.flatten(1)).masked_fill(pad.unsqueeze(-1), 0.0)

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor):
        reorder_batch_first(self, incremental_state, STATE_NAMES, new_order)

    # ---------------------------------------------------------------- readable definition

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition in attention form — weights phi(q_i) . phi(k_j) over the visible real frames,
        normalized — one frame at a time; for tests."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim)
                   for t in self.qkv(x.transpose(0, 1)).chunk(3, dim=-1))  # [B, T, H, D]
        q, k = self.features(q, True), self.features(k, False)  # [B, T, H, M]
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            for i in frames:
                seen = [j for j in frames if j <= i] if self.causal else frames
                weights = torch.stack([(q[b, i] * k[b, j]).sum(-1) for j in seen])  # [n, H]
                heads = (weights.unsqueeze(-1) * v[b, seen]).sum(0) / (weights.sum(0).unsqueeze(-1) + EPS)  # [H, D]
                out[b, i] = self.out_proj(heads.flatten())
        return out.transpose(0, 1)  # [T, B, C]


def linear_attention_from_spec(spec: MixerSpec) -> LinearAttention:
    """Builder for the mixer registry; heads = the side's attention heads, of embed dim // heads channels."""
    spec.check_equal_heads("linear attention")
    return LinearAttention(spec.embed_dim, spec.attention_heads, causal=spec.causal)
