"""Named architectures of ``lite_transformer`` (``--arch NAME``), values from the papers' configs.

Lite Transformer presets follow mit-han-lab/lite-transformer (configs/*/multibranch_v2/embed*.yml):
LSRA with the attention branch on half the channels (4 heads), a convolution branch on the other half
(4 heads, kernels 3,7,15,31,31,31), FFN dim = embed dim, post-norm, 6+6 layers.
"""
from __future__ import annotations

from fairseq.models import register_model_architecture

from lite.modules import CAUSAL_MIXERS

MODEL = "lite_transformer"


def _default(args, name: str, value) -> None:
    setattr(args, name, getattr(args, name, None) if getattr(args, name, None) is not None else value)


@register_model_architecture(MODEL, MODEL)
def base_architecture(args):
    _default(args, "encoder_mixer", "attention")
    # the encoder's mixer when it has a causal form, else the standard causal attention
    _default(args, "decoder_mixer", args.encoder_mixer if args.encoder_mixer in CAUSAL_MIXERS else "attention")
    _default(args, "encoder_embed_dim", 512)
    _default(args, "encoder_ffn_embed_dim", 4 * args.encoder_embed_dim)
    _default(args, "encoder_layers", 6)
    _default(args, "encoder_attention_heads", 8)
    _default(args, "encoder_kernel_size_list", "3,7,15,31,31,31")
    _default(args, "decoder_embed_dim", args.encoder_embed_dim)
    _default(args, "decoder_ffn_embed_dim", args.encoder_ffn_embed_dim)
    _default(args, "decoder_layers", 6)
    _default(args, "decoder_attention_heads", args.encoder_attention_heads)
    _default(args, "decoder_kernel_size_list", args.encoder_kernel_size_list)
    _default(args, "mixer_attention_heads", None)
    # head dims, conv_head_dim, gau_hidden_dim: set by pruning; None = derived (width // heads, expansion x width)
    _default(args, "encoder_attention_head_dim", None)
    _default(args, "decoder_attention_head_dim", None)
    _default(args, "mixer_attention_head_dim", None)
    _default(args, "conv_type", "lightweight")
    _default(args, "conv_heads", 4)
    _default(args, "conv_head_dim", None)
    _default(args, "conv_glu", False)
    _default(args, "weight_softmax", True)
    _default(args, "gau_expansion", 2)
    _default(args, "gau_hidden_dim", None)
    _default(args, "gau_key_dim", 128)
    _default(args, "chunk_size", 0)
    _default(args, "performer_features", 0)
    _default(args, "local_block", 16)
    _default(args, "synthesizer_max_len", 256)
    _default(args, "linformer_max_len", 256)
    _default(args, "linformer_k", 32)
    _default(args, "compress_stride", 3)
    _default(args, "stride", 4)
    _default(args, "longformer_window", 4)
    _default(args, "longformer_global", 1)
    _default(args, "bigbird_window", 3)
    _default(args, "bigbird_global", 1)
    _default(args, "bigbird_random", 2)
    _default(args, "bigbird_max_len", 256)
    _default(args, "isab_inducing_points", 8)
    _default(args, "routing_clusters", 4)
    _default(args, "routing_decay", 0.999)
    _default(args, "sinkhorn_block", 4)
    _default(args, "sinkhorn_iterations", 5)
    _default(args, "sinkhorn_temperature", 0.75)
    _default(args, "poolingformer_window", 4)
    _default(args, "poolingformer_pool_window", 16)
    _default(args, "poolingformer_pool", 4)
    _default(args, "reformer_buckets", 8)
    _default(args, "reformer_hashes", 1)
    _default(args, "reformer_chunk", 8)
    _default(args, "dropout", 0.1)
    _default(args, "attention_dropout", 0.0)
    _default(args, "weight_dropout", args.attention_dropout)
    _default(args, "activation_dropout", 0.0)
    _default(args, "activation_fn", "relu")
    _default(args, "normalize_before", False)
    _default(args, "share_all_embeddings", True)
    _default(args, "share_decoder_input_output_embed", args.share_all_embeddings)
    _default(args, "max_source_positions", 1024)
    _default(args, "max_target_positions", 1024)


def _lsra(args, dim: int) -> None:
    _default(args, "encoder_mixer", "lsra")
    _default(args, "encoder_embed_dim", dim)
    _default(args, "encoder_ffn_embed_dim", dim)  # flattened FFN
    _default(args, "mixer_attention_heads", 4)
    _default(args, "conv_heads", 4)


def _lsra_iwslt(args, dim: int) -> None:
    _lsra(args, dim)
    _default(args, "encoder_attention_heads", 4)
    _default(args, "conv_type", "lightweight")
    _default(args, "conv_glu", False)
    _default(args, "dropout", 0.2)
    _default(args, "weight_dropout", 0.1)
    base_architecture(args)


def _lsra_wmt(args, dim: int, dropout: float, attention_dropout: float) -> None:
    _lsra(args, dim)
    _default(args, "encoder_attention_heads", 8)  # cross attention; the LSRA branch keeps 4
    _default(args, "conv_type", "dynamic")
    _default(args, "conv_glu", True)
    _default(args, "dropout", dropout)
    _default(args, "attention_dropout", attention_dropout)
    _default(args, "weight_dropout", attention_dropout)
    base_architecture(args)


def _transformer(args, dim: int) -> None:
    _default(args, "encoder_mixer", "attention")
    _default(args, "encoder_embed_dim", dim)
    _default(args, "encoder_ffn_embed_dim", 4 * dim)
    _default(args, "encoder_attention_heads", 4 if dim < 256 else 8)
    base_architecture(args)


def _flash(args, dim: int, chunk_size: int) -> None:
    """FLASH-Quad (chunk 0) / FLASH: GAU layers without FFN, twice as many (two GAUs replace attention + FFN),
    pre-norm as in the paper's code; the decoder keeps a cross attention after each GAU."""
    _default(args, "encoder_mixer", "gau")
    _default(args, "encoder_embed_dim", dim)
    _default(args, "encoder_ffn_embed_dim", 0)
    _default(args, "encoder_layers", 12)
    _default(args, "decoder_layers", 12)
    _default(args, "encoder_attention_heads", 4 if dim < 256 else 8)  # cross attention
    _default(args, "chunk_size", chunk_size)
    _default(args, "encoder_kernel_size_list", "3")  # no convolution; one value serves any depth
    _default(args, "normalize_before", True)
    base_architecture(args)


def _fastformer(args, dim: int) -> None:
    """Fastformer additive attention in place of self-attention in a Transformer layer (FFN 4d, post-norm)."""
    _default(args, "encoder_mixer", "fastformer")
    _transformer(args, dim)


def _linear(args, dim: int) -> None:
    """Linear Transformer attention in place of self-attention in a Transformer layer (FFN 4d, post-norm)."""
    _default(args, "encoder_mixer", "linear")
    _transformer(args, dim)


def _performer(args, dim: int) -> None:
    """Performer (FAVOR+) attention in place of self-attention in a Transformer layer (FFN 4d, post-norm)."""
    _default(args, "encoder_mixer", "performer")
    _transformer(args, dim)


def _local(args, dim: int) -> None:
    """Blockwise local attention in place of self-attention in a Transformer layer (FFN 4d, post-norm)."""
    _default(args, "encoder_mixer", "local")
    _transformer(args, dim)


def _synthesizer(args, dim: int, kind: str) -> None:
    """Dense or random Synthesizer attention in place of self-attention in a Transformer layer (FFN 4d, post-norm)."""
    _default(args, "encoder_mixer", f"synthesizer_{kind}")
    _transformer(args, dim)


def _linformer(args, dim: int) -> None:
    """Linformer attention in the encoder's Transformer layers (FFN 4d, post-norm); it has no causal form, so the
    decoder keeps the standard causal attention."""
    _default(args, "encoder_mixer", "linformer")
    _default(args, "decoder_mixer", "attention")
    _transformer(args, dim)


def _memory_compressed(args, dim: int) -> None:
    """Memory-compressed attention in the encoder's Transformer layers (FFN 4d, post-norm); it has no causal form
    here, so the decoder keeps the standard causal attention."""
    _default(args, "encoder_mixer", "memory_compressed")
    _default(args, "decoder_mixer", "attention")
    _transformer(args, dim)


def _strided(args, dim: int) -> None:
    """Strided sparse attention in place of self-attention in a Transformer layer (FFN 4d, post-norm)."""
    _default(args, "encoder_mixer", "strided")
    _transformer(args, dim)


def _longformer(args, dim: int) -> None:
    """Longformer attention (sliding window + global tokens) in place of self-attention in a Transformer layer (FFN 4d,
    post-norm)."""
    _default(args, "encoder_mixer", "longformer")
    _transformer(args, dim)


def _bigbird(args, dim: int) -> None:
    """BigBird attention (window + global + random keys) in the encoder's Transformer layers (FFN 4d, post-norm); it
    has no causal form (random keys look ahead), so the decoder keeps the standard causal attention."""
    _default(args, "encoder_mixer", "bigbird")
    _default(args, "decoder_mixer", "attention")
    _transformer(args, dim)


def _isab(args, dim: int) -> None:
    """The Set Transformer's induced set attention (ISAB, m inducing points) in the encoder's Transformer layers (FFN
    4d, post-norm); it has no causal form (the inducing points summarize the whole sentence), so the decoder keeps the
    standard causal attention."""
    _default(args, "encoder_mixer", "isab")
    _default(args, "decoder_mixer", "attention")
    _transformer(args, dim)


def _poolingformer(args, dim: int) -> None:
    """Poolingformer attention (a window, then pooled keys/values in a wider window) in the encoder's Transformer
    layers (FFN 4d, post-norm); it has no causal form (the pooled windows look ahead), so the decoder keeps the
    standard causal attention."""
    _default(args, "encoder_mixer", "poolingformer")
    _default(args, "decoder_mixer", "attention")
    _transformer(args, dim)


def _routing(args, dim: int) -> None:
    """Routing attention (queries and keys routed to k-means centroids, attention within a cluster) in place of
    self-attention in a Transformer layer (FFN 4d, post-norm), encoder and decoder."""
    _default(args, "encoder_mixer", "routing")
    _transformer(args, dim)


def _sinkhorn(args, dim: int) -> None:
    """Sparse Sinkhorn attention (its block and a block sorted next to it) in place of self-attention in a Transformer
    layer (FFN 4d, post-norm); Causal Sinkhorn Balancing in the decoder."""
    _default(args, "encoder_mixer", "sinkhorn")
    _transformer(args, dim)


def _reformer(args, dim: int) -> None:
    """Reformer's LSH attention in place of self-attention in a Transformer layer (FFN 4d, post-norm): its chunked form
    in the encoder, its causal unchunked form in the decoder. Dims step by 4 (shared QK makes d=136 cheap, 90.5M MACs
    at 100M): 4 heads, 8 from d=256 where 8 divide d."""
    _default(args, "encoder_mixer", "reformer")
    _default(args, "encoder_attention_heads", 4 if dim < 256 or dim % 8 else 8)
    _transformer(args, dim)


@register_model_architecture(MODEL, "lsra_iwslt_160")
def lsra_iwslt_160(args):
    _lsra_iwslt(args, 160)


@register_model_architecture(MODEL, "lsra_iwslt_240")
def lsra_iwslt_240(args):
    _lsra_iwslt(args, 240)


@register_model_architecture(MODEL, "lsra_iwslt_320")
def lsra_iwslt_320(args):
    _lsra_iwslt(args, 320)


@register_model_architecture(MODEL, "lsra_wmt_200")
def lsra_wmt_200(args):
    _lsra_wmt(args, 200, dropout=0.04, attention_dropout=0.03)


@register_model_architecture(MODEL, "lsra_wmt_408")
def lsra_wmt_408(args):
    _lsra_wmt(args, 408, dropout=0.08, attention_dropout=0.06)


@register_model_architecture(MODEL, "lsra_wmt_496")
def lsra_wmt_496(args):
    _lsra_wmt(args, 496, dropout=0.1, attention_dropout=0.08)


@register_model_architecture(MODEL, "transformer_d128")
def transformer_d128(args):
    _transformer(args, 128)


@register_model_architecture(MODEL, "transformer_d256")
def transformer_d256(args):
    _transformer(args, 256)


@register_model_architecture(MODEL, "transformer_d320")
def transformer_d320(args):
    _transformer(args, 320)
