"""Export of a trained Transformer folder to CTranslate2 (https://opennmt.net/CTranslate2).

The weights are written through CTranslate2's own specification API (ctranslate2.specs, saved
by its Converter base class): a family that can be exported names its layout
(`ModelFamily.ctranslate2_layout`), whose spec is filled from the model's weights here; this
module saves it next to the SentencePiece model and a
seqmodels.json naming `"runtime": "ctranslate2"`, so the folder loads with
seqmodels.models.folder.load_predictor like any other (seqmodels.inference.ct2_predictors).

How the seqmodels Transformers map onto CTranslate2's layout, with no model change:
- pre-norm blocks with a final layer norm (pre_norm=True), torch's LayerNorm eps 1e-5
  (set in the config: CTranslate2's default differs);
- exact (erf) GELU in the feed-forward (Activation.GELU, not the tanh approximation);
- self-attention: q_proj and kv_proj concatenated into CTranslate2's fused QKV linear;
  cross-attention: q_proj as the query linear, kv_proj as the fused key/value linear;
- seq2seq: embeddings multiplied by sqrt(d_model) (scale_embeddings), plus positions. The
  sinusoidal table is written as the position encodings: CTranslate2's built-in one puts
  sines and cosines in two halves, ours interleaves them. Learned positions are written
  likewise. Source, target and output embeddings are the same matrix when shared;
- language model: learned positions, unscaled embeddings, output projection tied to the
  token embedding.
Nothing did not map; dropout does not exist at inference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from seqmodels.files import atomic_write_text, load_sentencepiece
from seqmodels.models.folder import META_FILE, family_and_architecture, read_model_meta

RUNTIME = "ctranslate2"
QUANTIZATIONS = ("float32", "float16", "int8", "int8_float16")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which every seqmodels layer norm uses


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def set_linear(spec: Any, linear: nn.Linear) -> None:
    spec.weight = _array(linear.weight)
    if linear.bias is not None:
        spec.bias = _array(linear.bias)


def set_layer_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def set_fused_self_attention(spec: Any, attn: nn.Module, norm: nn.LayerNorm) -> None:
    """Pre-norm self-attention: linear[0] is q, k, v stacked (our q_proj, then kv_proj)."""
    set_layer_norm(spec.layer_norm, norm)
    spec.linear[0].weight = _array(torch.cat([attn.q_proj.weight, attn.kv_proj.weight]))
    spec.linear[0].bias = _array(torch.cat([attn.q_proj.bias, attn.kv_proj.bias]))
    set_linear(spec.linear[1], attn.out_proj)


def set_cross_attention(spec: Any, attn: nn.Module, norm: nn.LayerNorm) -> None:
    """Cross-attention: linear[0] the query, linear[1] keys and values stacked (kv_proj)."""
    set_layer_norm(spec.layer_norm, norm)
    set_linear(spec.linear[0], attn.q_proj)
    set_linear(spec.linear[1], attn.kv_proj)
    set_linear(spec.linear[2], attn.out_proj)


def set_feed_forward(spec: Any, ffn: nn.Module, norm: nn.LayerNorm) -> None:
    set_layer_norm(spec.layer_norm, norm)
    set_linear(spec.linear_0, ffn.fc)
    set_linear(spec.linear_1, ffn.proj)


def transformer_seq2seq_spec(model: nn.Module, vocabulary: list[str]) -> Any:
    """A ctranslate2 TransformerSpec holding a seqmodels TransformerSeq2Seq's weights."""
    from ctranslate2.specs import common_spec, transformer_spec

    arch = model.arch
    spec = transformer_spec.TransformerSpec.from_config(
        (arch.n_enc_layers, arch.n_dec_layers),
        arch.n_head,
        pre_norm=True,
        activation=common_spec.Activation.GELU,
    )
    if arch.positions == "learned":
        positions = _array(model.pos_emb.weight)
    else:
        positions = _array(model.pos_table)
    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = _array(model.src_emb.weight)
    decoder.embeddings.weight = _array(model.tgt_emb.weight)
    decoder.projection.weight = decoder.embeddings.weight  # tied output matrix
    for side in (encoder, decoder):
        side.scale_embeddings = True  # x * sqrt(d_model), as TransformerSeq2Seq._embed
        side.position_encodings.encodings = positions
    set_layer_norm(encoder.layer_norm, model.enc_ln)
    set_layer_norm(decoder.layer_norm, model.dec_ln)
    for layer_spec, layer in zip(encoder.layer, model.enc_layers, strict=True):
        set_fused_self_attention(layer_spec.self_attention, layer.attn, layer.ln1)
        set_feed_forward(layer_spec.ffn, layer.ffn, layer.ln2)
    for layer_spec, layer in zip(decoder.layer, model.dec_layers, strict=True):
        set_fused_self_attention(layer_spec.self_attention, layer.self_attn, layer.ln1)
        set_cross_attention(layer_spec.attention, layer.cross_attn, layer.ln2)
        set_feed_forward(layer_spec.ffn, layer.ffn, layer.ln3)
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    spec.config.layer_norm_epsilon = LAYER_NORM_EPS
    _name_special_tokens(spec.config, vocabulary)
    return spec


def transformer_lm_spec(model: nn.Module, vocabulary: list[str]) -> Any:
    """A ctranslate2 TransformerDecoderModelSpec holding a seqmodels TransformerLanguageModel."""
    from ctranslate2.specs import common_spec, transformer_spec

    arch = model.arch
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        arch.n_layer, arch.n_head, pre_norm=True, activation=common_spec.Activation.GELU
    )
    decoder = spec.decoder
    decoder.embeddings.weight = _array(model.tok_emb.weight)
    decoder.projection.weight = decoder.embeddings.weight  # head is tied to tok_emb
    decoder.scale_embeddings = False
    decoder.position_encodings.encodings = _array(model.pos_emb.weight)
    set_layer_norm(decoder.layer_norm, model.ln_f)
    for layer_spec, block in zip(decoder.layer, model.blocks, strict=True):
        set_fused_self_attention(layer_spec.self_attention, block.attn, block.ln1)
        set_feed_forward(layer_spec.ffn, block.ffn, block.ln2)
    spec.register_vocabulary(vocabulary)
    spec.config.layer_norm_epsilon = LAYER_NORM_EPS
    _name_special_tokens(spec.config, vocabulary)
    return spec


# A family's ctranslate2_layout -> the function filling that spec from its model.
SPEC_BUILDERS = {"encoder_decoder": transformer_seq2seq_spec, "decoder": transformer_lm_spec}


def _name_special_tokens(config: Any, vocabulary: list[str]) -> None:
    """SentencePiece's ids (seqmodels: unk=1, bos=2, eos=3) by the pieces of this vocabulary."""
    from seqmodels import BOS_ID, EOS_ID, UNK_ID

    config.unk_token = vocabulary[UNK_ID]
    config.bos_token = vocabulary[BOS_ID]
    config.eos_token = vocabulary[EOS_ID]
    if hasattr(config, "decoder_start_token"):
        config.decoder_start_token = vocabulary[BOS_ID]  # decoding starts from BOS


def export_ctranslate2(model_folder: Path, out_dir: Path, quantization: str = "float32") -> Path:
    """Write a CTranslate2 folder of a trained seqmodels folder (its model, spm.model and a
    seqmodels.json with runtime "ctranslate2") to out_dir; returns out_dir.

    A ValueError names what cannot be exported: an unknown quantization, or a family that
    has no CTranslate2 layout (only the Transformer families have one).
    """
    from ctranslate2.converters.converter import Converter

    model_folder, out_dir = Path(model_folder), Path(out_dir)
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"unknown quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}"
        )
    meta = read_model_meta(model_folder)
    family, arch = family_and_architecture(meta, model_folder / META_FILE)
    if family.ctranslate2_layout not in SPEC_BUILDERS:
        raise ValueError(
            f"{model_folder}: a {meta['type']} model cannot be exported to CTranslate2 "
            "(only the Transformer families can)"
        )
    if meta.get("runtime") == RUNTIME:
        raise ValueError(f"{model_folder} is already a CTranslate2 export")
    sp = load_sentencepiece(model_folder / "spm.model")
    vocabulary = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    predictor = family.load(model_folder, arch, meta.get("decoding", {}), "cpu")
    spec = SPEC_BUILDERS[family.ctranslate2_layout](predictor.model, vocabulary)

    class SpecConverter(Converter):  # the base class validates, quantizes and saves
        def _load(self):
            return spec

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        SpecConverter().convert(str(staging / "model"), quantization=quantization)
        for path in (staging / "model").iterdir():
            path.rename(staging / path.name)
        (staging / "model").rmdir()
        shutil.copyfile(model_folder / "spm.model", staging / "spm.model")
        exported = {**meta, "runtime": RUNTIME, "quantization": quantization}
        atomic_write_text(staging / META_FILE, json.dumps(exported, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
