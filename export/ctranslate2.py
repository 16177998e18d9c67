"""CTranslate2 export of the plain Transformer family, and a translator that decodes as fairseq does.

    convert_to_ctranslate2("runs/transformer_d128/checkpoints/checkpoint_best.pt", "runs/ct2/d128", "int8")
    CT2Translator("runs/ct2/d128", "runs/multi30k/data").translate(["Ein Hund läuft."])

A ``lite_transformer`` checkpoint whose mixers are self-attention is written straight to CTranslate2's Transformer
spec (CTranslate2's own fairseq converter accepts fairseq's ``transformer`` model only), with the conventions of
that converter: fairseq's dictionaries in index order with ``<pad>`` renamed ``<blank>``, ``</s>`` appended to the
source (``add_source_eos``) and the target started with ``</s>`` (``decoder_start_token``), as fairseq does.
Pruned head dims (H x D != C) are kept (CTranslate2's ``head_dim``); the model dir's config.json also records the
arch and position limits under ``"lite"``. Importing this module does not import torch; converting does.

int8 on CPU: CTranslate2 picks its GEMM backend when it loads; on AMD CPUs it is oneDNN, whose u8s8 GEMM on AVX2
without VNNI cost a tiny test model ~12 BLEU where MKL (``CT2_USE_MKL=1`` in the environment) cost ~0.1.

Notation: C embed dim, H heads, D head dim.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import ctranslate2

from lite.data import SPM_MODEL
from lite.errors import LiteError
from lite.files import check_out_dir, staged_dir

# fairseq's --activation-fn -> CTranslate2's common_spec.Activation, as in CTranslate2's fairseq converter
ACTIVATIONS = {"relu": "RELU", "gelu": "GELU", "gelu_accurate": "GELUTanh", "gelu_fast": "GELUTanh", "swish": "SWISH"}
CONFIG_KEY = "lite"  # our entry in the model dir's config.json: arch and position limits, read by CT2Translator
MODEL_DIR = "CTranslate2 model dir"
VMAP = "vmap.txt"  # the vocabulary map CTranslate2 reads with use_vmap
SPECIALS = {"<s>", "</s>", "<blank>"}  # left out of output text, as fairseq's Dictionary.string does


class CT2Error(LiteError, ValueError):
    """A checkpoint, option or model dir that CTranslate2 conversion or translation cannot use."""


def _full_args(checkpoint: Path):
    """The checkpoint's model args with its architecture's defaults filled in; CT2Error for a non-lite arch."""
    from lite.checkpoint import model_args, read_state
    from lite.models.factory import arch_args, lite_archs

    args = model_args(read_state(checkpoint))
    arch = getattr(args, "arch", None)
    if arch not in lite_archs():
        raise CT2Error(f"{checkpoint}: arch {arch!r} is not a lite_transformer architecture; for fairseq's own "
                       f"`transformer` use CTranslate2's converter (ct2-fairseq-converter)")
    args = arch_args(arch, **{k: v for k, v in vars(args).items() if k != "arch"})
    args.arch = arch
    return args


def _problems(args) -> list[str]:
    """Every option of these args that CTranslate2's Transformer spec cannot express (empty: convertible)."""
    from lite.models.seq2seq import mixer_heads

    problems = []
    mixers = (args.encoder_mixer, args.decoder_mixer)
    if mixers != ("attention", "attention"):
        problems.append(f"its mixers are {mixers[0]!r} (encoder) / {mixers[1]!r} (decoder), not self-attention")
    if args.activation_fn not in ACTIVATIONS:
        problems.append(f"--activation-fn {args.activation_fn} (CTranslate2 has {', '.join(ACTIVATIONS)})")
    for side in ("encoder", "decoder"):
        if getattr(args, f"{side}_ffn_embed_dim") <= 0:
            problems.append(f"its {side} layers have no FFN")
    if mixers != ("attention", "attention"):  # the head checks below are about self-attention mixers
        return problems
    try:
        self_heads = mixer_heads(args, "decoder")
    except ValueError as e:  # a mixer head dim without mixer heads
        return [*problems, str(e)]
    cross_heads = args.decoder_attention_heads, getattr(args, "decoder_attention_head_dim", None)
    width = args.decoder_embed_dim
    (h_self, d_self), (h_cross, d_cross) = [(h, d or width // h) for h, d in (self_heads, cross_heads)]
    if (h_self, d_self) != (h_cross, d_cross):
        problems.append(f"decoder self-attention has {h_self} heads of {d_self} channels and cross attention "
                        f"{h_cross} of {d_cross} (CTranslate2's decoder layer has one head count and head dim; "
                        f"unset --mixer-attention-heads)")
    return problems


def _transformer_family() -> list[str]:
    from lite.models.factory import arch_args, lite_archs

    return [a for a in lite_archs() if not _problems(arch_args(a))]


def _vocabulary(dictionary) -> list[str]:
    """fairseq's symbols in index order, ``<pad>`` as CTranslate2's ``<blank>`` (like its fairseq converter)."""
    return ["<blank>" if token == "<pad>" else token for token in dictionary.symbols]


def _linear(spec, linear) -> None:
    spec.weight = linear.weight.detach().numpy()
    if linear.bias is not None:
        spec.bias = linear.bias.detach().numpy()


def _norm(spec, norm) -> None:
    spec.gamma, spec.beta = norm.weight.detach().numpy(), norm.bias.detach().numpy()


def _attention(spec, attn, self_attention: bool) -> None:
    """fairseq MultiheadAttention -> CTranslate2's: fused q|k|v [3HD, C] (self) or q [HD, C] and k|v [2HD, C_enc]
    (cross); out [C, HD]."""
    from ctranslate2.converters.utils import fuse_linear
    from ctranslate2.specs import common_spec

    q, k, v = (common_spec.LinearSpec() for _ in range(3))
    for part, proj in ((q, attn.q_proj), (k, attn.k_proj), (v, attn.v_proj)):
        _linear(part, proj)
    if self_attention:
        fuse_linear(spec.linear[0], [q, k, v])
    else:
        spec.linear[0] = q
        fuse_linear(spec.linear[1], [k, v])
    _linear(spec.linear[-1], attn.out_proj)


def _layer(spec, layer) -> None:
    """An EncoderLayer / DecoderLayer: each residual block's norm (pre or post) belongs to its sublayer's spec."""
    _attention(spec.self_attention, layer.mixer.attn, self_attention=True)
    _norm(spec.self_attention.layer_norm, layer.mixer_block.norm)
    if hasattr(layer, "cross_attention"):
        _attention(spec.attention, layer.cross_attention, self_attention=False)
        _norm(spec.attention.layer_norm, layer.cross_block.norm)
    _linear(spec.ffn.linear_0, layer.ffn.fc1)
    _linear(spec.ffn.linear_1, layer.ffn.fc2)
    _norm(spec.ffn.layer_norm, layer.ffn_block.norm)


def _stack(spec, module) -> None:
    """LiteEncoder / LiteDecoder -> its spec: embeddings x sqrt(C), fairseq's sinusoidal table, layers, final norm."""
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = module.embed_tokens.weight.detach().numpy()
    spec.scale_embeddings = True  # x sqrt(C), as lite's _embed
    positions = module.embed_positions
    spec.position_encodings.encodings = positions.weights[positions.padding_idx + 1:].numpy()  # row t: position t
    for layer_spec, layer in zip(spec.layer, module.layers):
        _layer(layer_spec, layer)
    if module.layer_norm is not None:
        _norm(spec.layer_norm, module.layer_norm)


def model_spec(model):
    """The CTranslate2 spec of a plain-Transformer ``LiteTransformerModel`` (its args checked by the caller), with
    the vocabularies of its encoder's and decoder's dictionaries."""
    from ctranslate2.specs import common_spec, transformer_spec

    args = model.args
    encoder, decoder = model.encoder.layers[0].mixer.attn, model.decoder.layers[0].mixer.attn  # H heads of D
    options = dict(pre_norm=bool(args.normalize_before),
                   activation=getattr(common_spec.Activation, ACTIVATIONS[args.activation_fn]))
    spec = transformer_spec.TransformerSpec(
        transformer_spec.TransformerEncoderSpec(args.encoder_layers, encoder.num_heads, head_dim=encoder.head_dim,
                                                **options),
        transformer_spec.TransformerDecoderSpec(args.decoder_layers, decoder.num_heads, head_dim=decoder.head_dim,
                                                **options))
    _stack(spec.encoder, model.encoder)
    _stack(spec.decoder, model.decoder)
    _linear(spec.decoder.projection, model.decoder.output_projection)
    spec.register_source_vocabulary(_vocabulary(model.encoder.dictionary))
    spec.register_target_vocabulary(_vocabulary(model.decoder.dictionary))
    spec.config.decoder_start_token = spec.config.eos_token  # fairseq's prev_output_tokens start with </s>
    spec.config.add_source_eos = True  # fairseq's source ends with </s>
    spec.config.layer_norm_epsilon = model.encoder.layers[0].mixer_block.norm.eps
    spec.config.add_attribute(CONFIG_KEY, {"arch": getattr(args, "arch", None),
                                           "max_source_positions": args.max_source_positions,
                                           "max_target_positions": args.max_target_positions})
    return spec


def convert_to_ctranslate2(checkpoint: str | Path, out_dir: str | Path, quantization: str | None = None,
                           force: bool = False, data: str | Path | None = None, vmap: str | Path | None = None) -> Path:
    """Write a plain-Transformer ``lite_transformer`` checkpoint as a CTranslate2 model dir; returns the dir.

    ``quantization``: None keeps float32 weights, else one of CTranslate2's types ("int8", "int8_float32", ...).
    ``data``: the prepared data dir, when not the one the checkpoint was trained on (its dictionaries are the
    vocabularies). The dir is written atomically; ``force`` replaces a CTranslate2 model dir, never another dir
    (OutputError). CT2Error, in one line, for an unknown quantization or a checkpoint with any option CTranslate2's
    Transformer cannot express (all of them listed). ``vmap``: a vocabulary map (``lite data shortlist``) copied in
    as CTranslate2's ``vmap.txt``, for ``CT2Translator(use_vmap=True)``.
    """
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES  # (imports torch)

    from lite.checkpoint import load_model

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_out_dir(out_dir, "model.bin", force, MODEL_DIR)
    if quantization is not None and quantization not in ACCEPTED_MODEL_TYPES:
        raise CT2Error(f"quantization {quantization!r}: CTranslate2 has {', '.join(ACCEPTED_MODEL_TYPES)}")
    args = _full_args(checkpoint)
    problems = _problems(args)
    if problems:
        raise CT2Error(f"{checkpoint}: arch {args.arch} cannot be converted to CTranslate2: {'; '.join(problems)}. "
                       f"Convertible: the plain Transformer family ({', '.join(_transformer_family())})")
    model, _ = load_model(checkpoint, data)
    spec = model_spec(model)
    spec.validate()
    spec.optimize(quantization=quantization)  # shares aliased weights (tied embeddings), then quantizes
    with staged_dir(out_dir, "model.bin", force, MODEL_DIR) as staging:
        spec.save(str(staging))
        if vmap is not None:
            shutil.copyfile(vmap, staging / VMAP)
    return out_dir


class CT2Translator:
    """sentencepiece -> CTranslate2 beam search -> sentencepiece, batched and bounded as lite's TorchTranslator
    (fairseq's SequenceGenerator): sentences sorted by length, ``batch_size`` a batch, at most
    ``int(max_len_a * S + max_len_b)`` tokens (S: the batch's longest source with </s>), no </s> first, no <pad>,
    scores normalized by length^lenpen with </s> counted. ``beam`` and ``batch_size`` may be changed between calls.
    ``use_vmap``: score only the target tokens of the dir's vocabulary map (``vmap.txt``) for the batch's source.

    Where a search runs into that limit the two can differ: fairseq scores the beams there with a forced </s>
    appended, CTranslate2 finishes them as they are (no </s>, no score for it).
    """

    def __init__(self, model_dir: str | Path, data: str | Path, beam: int = 4, lenpen: float = 1.0,
                 max_len_a: float = 1.2, max_len_b: int = 10, threads: int = 1, batch_size: int = 64,
                 compute_type: str = "default", use_vmap: bool = False):
        import sentencepiece as spm

        model_dir, data = Path(model_dir), Path(data)
        config_path = model_dir / "config.json"
        limits = json.loads(config_path.read_text()).get(CONFIG_KEY) if config_path.is_file() else None
        if limits is None:
            raise CT2Error(f"{model_dir}: not a model dir written by convert_to_ctranslate2 (no {CONFIG_KEY!r} entry "
                           f"in {config_path.name}); convert the checkpoint with export.ctranslate2")
        spm_model = data / SPM_MODEL if data.is_dir() else data
        if not spm_model.is_file():
            raise CT2Error(f"{spm_model} not found: pass the prepared data dir (with {SPM_MODEL}) or the "
                           f"sentencepiece model itself")
        if use_vmap and not (model_dir / VMAP).is_file():
            raise CT2Error(f"{model_dir}: no {VMAP}; convert with a vocabulary map (convert_to_ctranslate2(vmap=...))")
        self.use_vmap = use_vmap
        if beam < 1 or batch_size < 1:
            raise CT2Error(f"beam ({beam}) and batch size ({batch_size}) must be >= 1")
        self.spm = spm.SentencePieceProcessor(model_file=str(spm_model))
        self.translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type=compute_type,
                                                 inter_threads=1, intra_threads=threads)
        self.beam, self.lenpen, self.max_len_a, self.max_len_b = beam, lenpen, max_len_a, max_len_b
        self.batch_size = batch_size
        self.max_source_pieces = limits["max_source_positions"] - 1  # </s> is appended
        self.max_target_tokens = limits["max_target_positions"] - 1  # fairseq's cap on max_len

    def encode(self, line: str) -> list[str]:
        """Raw sentence -> source pieces (without </s>; CTranslate2 appends it), cut to the model's positions."""
        return self.spm.encode(line.strip(), out_type=str)[:self.max_source_pieces]

    def translate(self, lines: Iterable[str]) -> list[str]:
        """One output line per input line; empty input lines give empty output lines."""
        lines = list(lines)
        outputs = [""] * len(lines)
        todo = sorted(((i, self.encode(line)) for i, line in enumerate(lines) if line.strip()),
                      key=lambda item: len(item[1]))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            source_length = max(len(pieces) for _, pieces in batch) + 1  # padded, with </s>
            max_len = min(int(self.max_len_a * source_length + self.max_len_b), self.max_target_tokens)
            results = self.translator.translate_batch(
                [pieces for _, pieces in batch], beam_size=self.beam, length_penalty=self.lenpen,
                max_decoding_length=max_len, min_decoding_length=1, return_end_token=True,
                suppress_sequences=[["<blank>"]], max_input_length=0, use_vmap=self.use_vmap)
            for (i, _), result in zip(batch, results):
                outputs[i] = self.spm.decode([t for t in result.hypotheses[0] if t not in SPECIALS])
        return outputs
