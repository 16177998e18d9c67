"""The encoder-decoder every lite architecture is built on, registered in fairseq as ``lite_transformer``.

Each layer is ``mixer -> FFN`` (encoder) or ``causal mixer -> cross attention -> FFN`` (decoder), the
mixer chosen from ``lite.modules.MIXERS`` (attention, LSRA, convolution). Residual blocks are
post-norm by default, as in the Lite Transformer paper (``--normalize-before`` for pre-norm).

Notation: B batch, S source length, T target length, C embed dim, V vocabulary.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.models import (FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder,
                            register_model)
from fairseq.modules import LayerNorm, PositionalEmbedding
from torch import Tensor, nn

from lite.modules import CAUSAL_MIXERS, MIXERS, FeedForward, MixerSpec, build_mixer
from lite.modules.attention import multihead_attention
from lite.modules.incremental import IncrementalState

EncoderOut = Dict[str, List[Tensor]]


def _kernel_sizes(value: Any, layers: int) -> List[int]:
    """'3,7,15' or [3, 7, 15] -> per-layer list (one value repeats; a longer list is cut)."""
    sizes = [int(k) for k in (value.split(",") if isinstance(value, str) else value)]
    sizes = sizes * layers if len(sizes) == 1 else sizes[:layers]
    if len(sizes) != layers:
        raise ValueError(f"kernel size list {value!r} has fewer entries than the {layers} layers")
    return sizes


def _given(value: Any, default: int) -> int:
    """An option's value, or ``default`` when unset (None: absent from args or from an older checkpoint); 0 stays 0."""
    return default if value is None else value


def mixer_heads(args, side: str) -> tuple[int, int | None]:
    """(heads, head dim or None) of a side's mixer attention: --mixer-attention-heads/-head-dim when the heads are
    set, else the side's --{side}-attention-heads/-head-dim."""
    if getattr(args, "mixer_attention_heads", None):
        return args.mixer_attention_heads, getattr(args, "mixer_attention_head_dim", None)
    if getattr(args, "mixer_attention_head_dim", None) is not None:
        raise ValueError(f"--mixer-attention-head-dim {args.mixer_attention_head_dim} needs --mixer-attention-heads "
                         f"(or set --{side}-attention-head-dim instead)")
    return getattr(args, f"{side}_attention_heads"), getattr(args, f"{side}_attention_head_dim", None)


def _mixer_spec(args, side: str, layer: int, causal: bool) -> MixerSpec:
    heads, head_dim = mixer_heads(args, side)
    return MixerSpec(
        embed_dim=getattr(args, f"{side}_embed_dim"),
        attention_heads=heads,
        causal=causal,
        kernel_size=_kernel_sizes(getattr(args, f"{side}_kernel_size_list"), getattr(args, f"{side}_layers"))[layer],
        conv_type=args.conv_type,
        conv_heads=args.conv_heads,
        conv_glu=args.conv_glu,
        weight_softmax=args.weight_softmax,
        weight_dropout=args.weight_dropout,
        attention_dropout=args.attention_dropout,
        gau_expansion=args.gau_expansion,
        gau_key_dim=args.gau_key_dim,
        chunk_size=args.chunk_size,
        attention_head_dim=head_dim,
        gau_hidden_dim=getattr(args, "gau_hidden_dim", None),
        conv_head_dim=getattr(args, "conv_head_dim", None),
        performer_features=getattr(args, "performer_features", None) or 0,  # absent from checkpoints made before it
        local_block=getattr(args, "local_block", None) or 16,
        synthesizer_max_len=getattr(args, "synthesizer_max_len", None) or 256,
        linformer_max_len=getattr(args, "linformer_max_len", None) or 256,
        linformer_k=getattr(args, "linformer_k", None) or 32,
        compress_stride=getattr(args, "compress_stride", None) or 3,
        stride=getattr(args, "stride", None) or 4,
        longformer_window=_given(getattr(args, "longformer_window", None), 4),
        longformer_global=_given(getattr(args, "longformer_global", None), 1),
        bigbird_window=_given(getattr(args, "bigbird_window", None), 3),
        bigbird_global=_given(getattr(args, "bigbird_global", None), 1),
        bigbird_random=_given(getattr(args, "bigbird_random", None), 2),
        bigbird_max_len=getattr(args, "bigbird_max_len", None) or 256,
        isab_inducing_points=_given(getattr(args, "isab_inducing_points", None), 8),
        routing_clusters=_given(getattr(args, "routing_clusters", None), 4),
        routing_decay=_given(getattr(args, "routing_decay", None), 0.999),
        sinkhorn_block=_given(getattr(args, "sinkhorn_block", None), 4),
        sinkhorn_iterations=_given(getattr(args, "sinkhorn_iterations", None), 5),
        sinkhorn_temperature=_given(getattr(args, "sinkhorn_temperature", None), 0.75),
        poolingformer_window=_given(getattr(args, "poolingformer_window", None), 4),
        poolingformer_pool_window=_given(getattr(args, "poolingformer_pool_window", None), 16),
        poolingformer_pool=_given(getattr(args, "poolingformer_pool", None), 4),
        reformer_buckets=_given(getattr(args, "reformer_buckets", None), 8),
        reformer_hashes=_given(getattr(args, "reformer_hashes", None), 1),
        reformer_chunk=_given(getattr(args, "reformer_chunk", None), 8),
    )


class Residual(nn.Module):
    """x + dropout(f(norm(x))) when pre-norm, norm(x + dropout(f(x))) when post-norm."""

    def __init__(self, embed_dim: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.norm = LayerNorm(embed_dim)
        self.dropout, self.normalize_before = dropout, normalize_before

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        h = sublayer(self.norm(x) if self.normalize_before else x)
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        return x if self.normalize_before else self.norm(x)


def _ffn(dim: int, hidden: int, args) -> Optional[FeedForward]:
    """The FFN of a layer; none when its hidden dim is 0 (a GAU layer carries its own gating)."""
    return FeedForward(dim, hidden, args.activation_fn, args.activation_dropout) if hidden > 0 else None


class EncoderLayer(nn.Module):
    """Mixer, then FFN (if any); each in a residual block. Shape: Input/Output S x B x C."""

    def __init__(self, args, layer: int):
        super().__init__()
        dim = args.encoder_embed_dim
        self.mixer = build_mixer(args.encoder_mixer, _mixer_spec(args, "encoder", layer, causal=False))
        self.ffn = _ffn(dim, args.encoder_ffn_embed_dim, args)
        self.mixer_block = Residual(dim, args.dropout, args.normalize_before)
        self.ffn_block = None if self.ffn is None else Residual(dim, args.dropout, args.normalize_before)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        x = self.mixer_block(x, lambda h: self.mixer(h, padding_mask))
        return x if self.ffn is None else self.ffn_block(x, self.ffn)


class DecoderLayer(nn.Module):
    """Causal mixer, cross attention over the encoder output, FFN. Shape: Input/Output T x B x C."""

    def __init__(self, args, layer: int):
        super().__init__()
        dim = args.decoder_embed_dim
        self.mixer = build_mixer(args.decoder_mixer, _mixer_spec(args, "decoder", layer, causal=True))
        self.cross_attention = multihead_attention(
            dim, args.decoder_attention_heads, getattr(args, "decoder_attention_head_dim", None),
            kdim=args.encoder_embed_dim, vdim=args.encoder_embed_dim, dropout=args.attention_dropout,
            encoder_decoder_attention=True)
        self.ffn = _ffn(dim, args.decoder_ffn_embed_dim, args)
        self.mixer_block = Residual(dim, args.dropout, args.normalize_before)
        self.cross_block = Residual(dim, args.dropout, args.normalize_before)
        self.ffn_block = None if self.ffn is None else Residual(dim, args.dropout, args.normalize_before)

    def forward(self, x: Tensor, memory: Optional[Tensor], memory_padding_mask: Optional[Tensor],
                incremental_state: IncrementalState) -> Tensor:
        x = self.mixer_block(x, lambda h: self.mixer(h, None, incremental_state))
        x = self.cross_block(x, lambda h: self.cross_attention(
            h, memory, memory, key_padding_mask=memory_padding_mask, incremental_state=incremental_state,
            static_kv=True, need_weights=False)[0])
        return x if self.ffn is None else self.ffn_block(x, self.ffn)


def longest_input(layers: nn.Module, positions: int) -> int:
    """The positions a side can read: its table's, or fewer where a mixer has a fixed maximum length (Synthesizer,
    Linformer: ``max_len``). fairseq and both translators size and truncate inputs by it."""
    return min([positions, *(m.max_len for m in layers.modules() if isinstance(getattr(m, "max_len", None), int))])


def _embed(tokens: Tensor, positions: Tensor, embed_tokens: nn.Embedding, dropout: float, training: bool) -> Tensor:
    """Scaled token embedding + positions: B x L -> L x B x C."""
    x = math.sqrt(embed_tokens.embedding_dim) * embed_tokens(tokens) + positions
    return F.dropout(x, p=dropout, training=training).transpose(0, 1)


class LiteEncoder(FairseqEncoder):
    """Shape: src_tokens B x S -> encoder_out S x B x C, encoder_padding_mask B x S."""

    def __init__(self, args, dictionary, embed_tokens: nn.Embedding):
        super().__init__(dictionary)
        self.dropout = args.dropout
        self.embed_tokens = embed_tokens
        self.padding_idx = embed_tokens.padding_idx
        self.embed_positions = PositionalEmbedding(args.max_source_positions, args.encoder_embed_dim,
                                                   self.padding_idx, learned=False)
        self.layers = nn.ModuleList(EncoderLayer(args, i) for i in range(args.encoder_layers))
        self.layer_norm = LayerNorm(args.encoder_embed_dim) if args.normalize_before else None
        self.max_source_positions = args.max_source_positions

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None) -> EncoderOut:
        padding_mask = src_tokens.eq(self.padding_idx)  # [B, S]
        x = _embed(src_tokens, self.embed_positions(src_tokens), self.embed_tokens, self.dropout, self.training)
        x = x.masked_fill(padding_mask.transpose(0, 1).unsqueeze(-1), 0.0)  # [S, B, C]
        for layer in self.layers:
            x = layer(x, padding_mask)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return {"encoder_out": [x], "encoder_padding_mask": [padding_mask], "src_lengths":
                [] if src_lengths is None else [src_lengths]}

    @torch.jit.export
    def reorder_encoder_out(self, encoder_out: EncoderOut, new_order: Tensor) -> EncoderOut:
        return {
            "encoder_out": [encoder_out["encoder_out"][0].index_select(1, new_order)],
            "encoder_padding_mask": [encoder_out["encoder_padding_mask"][0].index_select(0, new_order)],
            "src_lengths": [t.index_select(0, new_order) for t in encoder_out["src_lengths"]],
        }

    def max_positions(self) -> int:
        return longest_input(self.layers, self.max_source_positions)


class LiteDecoder(FairseqIncrementalDecoder):
    """Shape: prev_output_tokens B x T -> logits B x T x V (B x 1 x V when stepping)."""

    def __init__(self, args, dictionary, embed_tokens: nn.Embedding):
        super().__init__(dictionary)
        self.dropout = args.dropout
        self.embed_tokens = embed_tokens
        self.embed_positions = PositionalEmbedding(args.max_target_positions, args.decoder_embed_dim,
                                                   embed_tokens.padding_idx, learned=False)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.decoder_layers))
        self.layer_norm = LayerNorm(args.decoder_embed_dim) if args.normalize_before else None
        self.output_projection = nn.Linear(args.decoder_embed_dim, len(dictionary), bias=False)
        if args.share_decoder_input_output_embed:
            self.output_projection.weight = embed_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0, std=args.decoder_embed_dim ** -0.5)
        self.max_target_positions = args.max_target_positions

    def forward(self, prev_output_tokens: Tensor, encoder_out: Optional[EncoderOut] = None,
                incremental_state: IncrementalState = None, features_only: bool = False, **unused):
        x, extra = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        return (x if features_only else self.output_layer(x)), extra

    def extract_features(self, prev_output_tokens: Tensor, encoder_out: Optional[EncoderOut] = None,
                         incremental_state: IncrementalState = None, **unused):
        # positions are read off the whole prefix; when stepping only the last token is embedded
        positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)  # [B, T|1, C]
        tokens = prev_output_tokens[:, -1:] if incremental_state is not None else prev_output_tokens
        x = _embed(tokens, positions, self.embed_tokens, self.dropout, self.training)  # [T, B, C]
        x = self._layers(x, encoder_out["encoder_out"][0], encoder_out["encoder_padding_mask"][0], incremental_state)
        return x, {"attn": [None]}

    def decode_step(self, tokens: Tensor, step: Tensor, incremental_state: Dict[str, Dict[str, Optional[Tensor]]]
                    ) -> Tensor:
        """One step at an explicit position, every state (cross attention's keys/values included) already in
        ``incremental_state``: the form the ONNX decoder-step graph is traced from.

        Shape: tokens [B] (the previous output token), step [] (0-based) -> features [B, 1, C].
        """
        table = self.embed_positions.weights  # [max positions + pad + 1, C]; position t is row pad + 1 + t
        positions = table.index_select(0, (self.embed_positions.padding_idx + 1 + step).view(1))  # [1, C]
        x = _embed(tokens.unsqueeze(1), positions.unsqueeze(0), self.embed_tokens, self.dropout, self.training)
        return self._layers(x, None, None, incremental_state)

    def _layers(self, x: Tensor, memory: Optional[Tensor], memory_padding_mask: Optional[Tensor],
                incremental_state: IncrementalState) -> Tensor:
        """Embedded target T x B x C -> features B x T x C (memory S x B x C, its padding mask B x S)."""
        for layer in self.layers:
            x = layer(x, memory, memory_padding_mask, incremental_state)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x.transpose(0, 1)

    def output_layer(self, features: Tensor) -> Tensor:
        return self.output_projection(features)

    def max_positions(self) -> int:
        return longest_input(self.layers, self.max_target_positions)


@register_model("lite_transformer")
class LiteTransformerModel(FairseqEncoderDecoderModel):
    """Encoder-decoder with a pluggable token mixer per side; see ``lite/models/architectures.py``."""

    @staticmethod
    def add_args(parser):
        add = parser.add_argument
        add("--encoder-mixer", choices=sorted(MIXERS), help="token mixer of the encoder layers")
        add("--decoder-mixer", choices=sorted(MIXERS), help="causal token mixer of the decoder layers")
        for side in ("encoder", "decoder"):
            add(f"--{side}-embed-dim", type=int, metavar="N")
            add(f"--{side}-ffn-embed-dim", type=int, metavar="N")
            add(f"--{side}-layers", type=int, metavar="N")
            add(f"--{side}-attention-heads", type=int, metavar="N")
            add(f"--{side}-kernel-size-list", type=str, metavar="K,K,...",
                help="convolution kernel size per layer (one value repeats)")
        add("--mixer-attention-heads", type=int, metavar="N",
            help="heads of the mixer's attention (LSRA branch); default: the side's attention heads")
        for prefix, what in (("encoder", "encoder self-attention"), ("decoder", "decoder self- and cross attention"),
                             ("mixer", "mixer attention, with --mixer-attention-heads")):
            add(f"--{prefix}-attention-head-dim", type=int, metavar="D",
                help=f"channels per head of the {what} (q/k/v: width -> heads x D); default: width // heads")
        add("--gau-expansion", type=int, metavar="E", help="GAU: width of U and V = E x embed dim")
        add("--gau-hidden-dim", type=int, metavar="E", help="GAU: width of U and V; default: gau expansion x embed dim")
        add("--gau-key-dim", type=int, metavar="S", help="GAU: width of the shared Z that Q and K are made from")
        add("--chunk-size", type=int, metavar="C", help="FLASH: mixed-chunk attention chunk; 0 = quadratic")
        add("--performer-features", type=int, metavar="M", help="Performer: random features per head; 0 = D ln D")
        add("--local-block", type=int, metavar="L",
            help="local attention: block size; a query attends to its block and the previous one")
        add("--synthesizer-max-len", type=int, metavar="N",
            help="Synthesizer: the longest input (its logits cover N positions); longer inputs are refused")
        add("--linformer-max-len", type=int, metavar="N",
            help="Linformer (encoder only): the longest input (E, F are k x N); longer inputs are refused")
        add("--linformer-k", type=int, metavar="K", help="Linformer: the length keys and values are projected to")
        add("--compress-stride", type=int, metavar="S",
            help="memory-compressed attention (encoder only): kernel and stride of the key/value convolution")
        add("--stride", type=int, metavar="S",
            help="strided attention: local heads see the last S positions, strided heads every S-th one")
        add("--longformer-window", type=int, metavar="W",
            help="Longformer: a query sees the keys within W positions on each side (decoder: the last W)")
        add("--longformer-global", type=int, metavar="G",
            help="Longformer: the first G real tokens attend to every key and every query attends to them")
        add("--bigbird-window", type=int, metavar="W",
            help="BigBird (encoder only): a query sees the keys within W positions on each side")
        add("--bigbird-global", type=int, metavar="G",
            help="BigBird: the first G real tokens attend to every key and every query attends to them")
        add("--bigbird-random", type=int, metavar="R",
            help="BigBird: R random keys a query, drawn once at build time from a fixed seed (kept in the checkpoint)")
        add("--bigbird-max-len", type=int, metavar="N",
            help="BigBird: the longest input (random keys are drawn for N positions); longer inputs are refused")
        add("--isab-inducing-points", type=int, metavar="M",
            help="ISAB (encoder only): M learned inducing points attend to the sentence, its frames attend to them")
        add("--routing-clusters", type=int, metavar="N",
            help="routing attention: N k-means centroids a head; a query attends to the keys of its nearest one")
        add("--routing-decay", type=float, metavar="D",
            help="routing attention: the centroids' moving-average decay in training, in [0, 1) (frozen in eval)")
        add("--sinkhorn-block", type=int, metavar="B",
            help="Sinkhorn attention (encoder only): blocks of B frames; a query sees its block and its sorted block")
        add("--sinkhorn-iterations", type=int, metavar="K",
            help="Sinkhorn attention: K rounds of row and column normalization of the block permutation")
        add("--sinkhorn-temperature", type=float, metavar="TAU",
            help="Sinkhorn attention: the SortNet's scores are divided by TAU before the normalization")
        add("--poolingformer-window", type=int, metavar="W1",
            help="Poolingformer (encoder only): the first level's sliding window, W1 positions on each side")
        add("--poolingformer-pool-window", type=int, metavar="W2",
            help="Poolingformer: the second level attends to the pools holding a position within W2 on each side")
        add("--poolingformer-pool", type=int, metavar="K",
            help="Poolingformer: the second level's keys and values pooled by a strided conv, kernel = stride = K")
        add("--reformer-buckets", type=int, metavar="N",
            help="Reformer: LSH buckets a hash round (even); a query sees the keys of its bucket only")
        add("--reformer-hashes", type=int, metavar="R",
            help="Reformer: hash rounds, combined by their logsumexp weights (rotations drawn once from a fixed seed)")
        add("--reformer-chunk", type=int, metavar="L",
            help="Reformer (encoder): chunk length in bucket-sorted order; a chunk sees itself and the previous one "
                 "(the causal decoder form has no chunks)")
        add("--conv-type", choices=["lightweight", "dynamic"])
        add("--conv-heads", type=int, metavar="N")
        add("--conv-head-dim", type=int, metavar="R",
            help="channels per conv head: the conv branch works on conv heads x R channels; default: width // heads")
        add("--conv-glu", type=utils.eval_bool, metavar="BOOL", help="Linear C->2C + GLU before the convolution")
        add("--weight-softmax", type=utils.eval_bool, metavar="BOOL")
        add("--weight-dropout", type=float, metavar="D", help="dropout on the convolution kernels")
        add("--dropout", type=float, metavar="D")
        add("--attention-dropout", type=float, metavar="D")
        add("--activation-dropout", type=float, metavar="D")
        add("--activation-fn", choices=utils.get_available_activation_fns())
        add("--normalize-before", type=utils.eval_bool, metavar="BOOL", help="pre-norm residual blocks")
        add("--share-all-embeddings", type=utils.eval_bool, metavar="BOOL",
            help="one embedding for source, target and output (needs a joined dictionary)")
        add("--share-decoder-input-output-embed", type=utils.eval_bool, metavar="BOOL")

    @classmethod
    def build_model(cls, args, task):
        from lite.models.architectures import base_architecture

        base_architecture(args)
        check_decoder_mixer(args)
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
        if args.share_all_embeddings:
            if src_dict != tgt_dict:
                raise ValueError("--share-all-embeddings needs a joined dictionary "
                                 "(lite data prepare writes one; or pass --share-all-embeddings false)")
            if args.encoder_embed_dim != args.decoder_embed_dim:
                raise ValueError("--share-all-embeddings needs encoder and decoder embed dims to be equal")
            args.share_decoder_input_output_embed = True
            encoder_embed = decoder_embed = _embedding(src_dict, args.encoder_embed_dim)
        else:
            encoder_embed = _embedding(src_dict, args.encoder_embed_dim)
            decoder_embed = _embedding(tgt_dict, args.decoder_embed_dim)
        model = cls(LiteEncoder(args, src_dict, encoder_embed), LiteDecoder(args, tgt_dict, decoder_embed))
        model.args = args
        return model


def check_decoder_mixer(args) -> None:
    """A decoder needs a causal mixer: any other is refused here, at build, in one line naming those that serve."""
    if args.decoder_mixer not in CAUSAL_MIXERS:
        raise ValueError(f"--decoder-mixer {args.decoder_mixer}: {args.decoder_mixer} has no causal form, so it "
                         f"cannot serve in the decoder; mechanisms that can: {', '.join(sorted(CAUSAL_MIXERS))}")


def _embedding(dictionary, dim: int) -> nn.Embedding:
    embedding = nn.Embedding(len(dictionary), dim, padding_idx=dictionary.pad())
    nn.init.normal_(embedding.weight, mean=0, std=dim ** -0.5)
    nn.init.constant_(embedding.weight[dictionary.pad()], 0)
    return embedding
