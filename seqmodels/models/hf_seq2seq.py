"""Pretrained Hugging Face sequence-to-sequence models (`AutoModelForSeq2SeqLM`: Marian, T5,
BART, mBART), fine-tuned by the seqmodels trainer on the cleaned pairs with the checkpoint's
own tokenizer, decoded with the model's `generate` (beam search settings from `evaluation`).

Each checkpoint frames its sequences its own way: Marian and T5 end the source with </s> and
start the decoder with <pad>; BART wraps the source in <s> ... </s>; mBART adds language codes.
`pair_framing` reads that framing off the tokenizer (what it adds around a probe text) and the
config (the decoder start), so the shared batching (seqmodels.training.batching.PairFraming)
needs no per-checkpoint code. T5's task prefix and mBART's language codes are settings.

The model folder holds, beside model.pt, the checkpoint's config and tokenizer in `hf/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from seqmodels.data.splits import encode_lines
from seqmodels.inference.predictors import source_room
from seqmodels.models.family import Seq2SeqFamily
from seqmodels.models.huggingface import (
    HF_DIR,
    HFTokenizer,
    PretrainedArchitecture,
    PretrainedFamily,
    context_length,
    hf_pipeline,
    pretrained_config,
    without_lora,
)
from seqmodels.training.batching import PairFraming, truncate_sources
from seqmodels.training.flops import matmul_params, seq2seq_flops_per_token

PROBE = "a b c"  # any text the tokenizer splits into ordinary tokens
LONG_SOURCE = 100  # source tokens the exported pipeline's output budget is sized for


class HFSeq2SeqArchitecture(PretrainedArchitecture):
    """`pretrained:` an AutoModelForSeq2SeqLM checkpoint (folder or hub id)."""

    # T5 is told its task in the text: "translate German to English: " (put before every
    # source, in training and decoding alike).
    source_prefix: str = ""
    # mBART / NLLB language codes (the tokenizer's src_lang / tgt_lang), e.g. de_DE, en_XX.
    source_lang: str | None = None
    target_lang: str | None = None


def around(full: list[int], content: list[int], what: str) -> tuple[tuple, tuple]:
    """(prefix, suffix): the ids `full` has before and after `content`."""
    for start in range(len(full) - len(content) + 1):
        if full[start : start + len(content)] == content:
            return tuple(full[:start]), tuple(full[start + len(content) :])
    raise ValueError(f"cannot tell the special tokens of the {what}: {full} lacks {content}")


def pair_framing(tok: HFTokenizer, decoder_start: int | None) -> PairFraming:
    """The checkpoint's framing: what its tokenizer adds around a source and a target, and
    the decoder's start token (config.decoder_start_token_id; mBART-cc25 has none and starts
    with the target language code, the last token of its labels)."""
    hf = tok.tokenizer
    plain = hf(PROBE, add_special_tokens=False)["input_ids"]
    src_prefix, src_suffix = around(hf(PROBE)["input_ids"], plain, "source")
    plain = hf(text_target=PROBE, add_special_tokens=False)["input_ids"]
    label_prefix, label_suffix = around(hf(text_target=PROBE)["input_ids"], plain, "target")
    if decoder_start is None:
        if not label_suffix:
            raise ValueError("the checkpoint sets no decoder_start_token_id")
        decoder_start = label_suffix[-1]
    if hf.pad_token_id is None:
        raise ValueError(f"tokenizer {hf.name_or_path!r} has no pad token")
    return PairFraming(
        src_prefix, src_suffix, (int(decoder_start), *label_prefix), label_suffix, hf.pad_token_id
    )


class HFSeq2Seq(nn.Module):
    """An AutoModelForSeq2SeqLM behind the seqmodels training interface."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    @property
    def max_positions(self) -> int | None:
        return context_length(self.hf.config)

    def forward(
        self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor
    ) -> torch.Tensor:
        out = self.hf(
            input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in, use_cache=False
        )
        return out.logits

    def flops_per_token(self, src_len: float, tgt_len: float) -> float:
        """6N with the encoder scaled by the length ratio (attention left out: at the lengths
        of sentence pairs it is a few per cent)."""
        encoder = {id(p) for p in self.hf.get_encoder().parameters()}
        prefixes = tuple(f"{n}" for n, p in self.named_parameters() if id(p) in encoder)
        enc, other = matmul_params(self, prefixes)
        return seq2seq_flops_per_token(enc, other, src_len, tgt_len)


class HFSeq2SeqPredictor:
    """Translates (or summarises) with the model's own beam search (`generate`).

    The decoding settings (seqmodels.inference.predictors.DECODING_KEYS) become generate's own
    arguments (`generate_settings`): beam_size -> num_beams, max_len_a/b -> max_new_tokens,
    min_len -> min_new_tokens (the max wins), no_repeat_ngram_size as it is. length_penalty
    is passed as it is, but Hugging Face's is another formula than GNMT's (seqmodels' beam
    search): it divides a finished hypothesis' log-probability by |Y| ** alpha (|Y|: generated
    tokens, EOS included), GNMT by ((5 + |Y|) / 6) ** alpha; alpha 0 ranks by log-probability
    in both, alpha 1 is the mean log-probability here, a milder penalty in GNMT.
    max_source_tokens cuts the tokenized source (the T5 task prefix included, as training
    cut it) before the checkpoint's special tokens are put around it; `truncated_sources`
    counts the inputs of the last call that were cut (by it or by the model's positions).
    """

    default_task = "translate"

    def __init__(self, model: HFSeq2Seq, tok: HFTokenizer, framing: PairFraming, options: dict):
        self.model, self.sp, self.framing = model, tok, framing
        options = {k: v for k, v in options.items() if v is not None}
        self.source_prefix = options.get("source_prefix", "")
        self.beam_size = int(options.get("beam_size", 5))
        self.max_len_a = float(options.get("max_len_a", 1.2))
        self.max_len_b = float(options.get("max_len_b", 10))
        self.min_len = int(options.get("min_len", 0))
        self.length_penalty = float(options.get("length_penalty", 1.0))
        self.no_repeat_ngram_size = int(options.get("no_repeat_ngram_size", 0))
        cap = options.get("max_source_tokens")
        self.max_source_tokens = None if cap is None else int(cap)
        self.batch_size = int(options.get("batch_size", 64))
        self.device = next(model.parameters()).device
        self.truncated_sources = 0

    def summarize(self, texts: list[str]) -> list[str]:
        """Summaries: the same decoding as `translate` (the settings make it a summariser)."""
        return self.translate(texts)

    def translate(self, sentences: list[str]) -> list[str]:
        limit = self.model.max_positions
        f = self.framing
        room = source_room(self.max_source_tokens, f.source_room(limit) if limit else None)
        encoded = self.sp.encode([self.source_prefix + s for s in sentences])
        cut, self.truncated_sources = truncate_sources(encoded, room)
        sources = [[*f.src_prefix, *ids, *f.src_suffix] for ids in cut]
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # less padding
        out = [""] * len(sources)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            for i, text in zip(idx, self.generate_batch([sources[i] for i in idx]), strict=True):
                out[i] = text
        return out

    def output_budget(self, source_length: int) -> int:
        """max_len_a * source + max_len_b new tokens, within the decoder's positions."""
        budget = int(self.max_len_a * source_length + self.max_len_b)
        limit = self.model.max_positions
        return budget if limit is None else min(budget, limit - len(self.framing.tgt_prefix))

    def generate_settings(self, source_length: int) -> dict[str, Any]:
        """generate's arguments (and the exported model's generation config) for sources of up
        to source_length tokens. Every constraint is passed, off ones as 0: a summarisation
        checkpoint's own generation config (BART-CNN: min_length 56, no_repeat_ngram_size 3)
        must not decode in place of the experiment's settings; generate adds no logits
        processor for a 0, so off costs nothing."""
        start, *forced = self.framing.tgt_prefix
        budget = self.output_budget(source_length)
        settings = {
            "num_beams": self.beam_size,
            "length_penalty": self.length_penalty,  # HF's formula: see the class docstring
            "max_new_tokens": budget,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "decoder_start_token_id": start,
            "forced_bos_token_id": forced[0] if forced else None,
            "early_stopping": True,
        }
        if self.min_len > 0:
            # A forced language code (mBART) is a new token too, but no part of the text.
            # (generate derives min_length from min_new_tokens: passing both only warns.)
            settings["min_new_tokens"] = min(self.min_len + len(forced), budget)
        else:
            settings["min_length"] = 0
        return settings

    @torch.no_grad()
    def generate_batch(self, sources: list[list[int]]) -> list[str]:
        longest = max(len(s) for s in sources)
        ids = np.full((len(sources), longest), self.framing.pad_id, dtype=np.int64)
        mask = np.zeros((len(sources), longest), dtype=np.int64)
        for r, s in enumerate(sources):
            ids[r, : len(s)], mask[r, : len(s)] = s, 1
        generated = self.model.hf.generate(
            input_ids=torch.from_numpy(ids).to(self.device),
            attention_mask=torch.from_numpy(mask).to(self.device),
            do_sample=False,
            **self.generate_settings(longest),
        )
        return [self.sp.decode(row.tolist()) for row in generated]


class HFSeq2SeqFamily(PretrainedFamily, Seq2SeqFamily):
    """Fine-tunes a pretrained Hugging Face encoder-decoder with its own tokenizer."""

    Architecture = HFSeq2SeqArchitecture
    transformers_task = "translation"

    def transformers_task_for(self, task: str) -> str | None:
        # A summariser is registered as what it is: MLflow's flavor and HF pipelines know
        # "summarization" (the same generate, a different name and output key).
        return "summarization" if task == "summarization" else self.transformers_task

    auto_class = "AutoModelForSeq2SeqLM"
    wrapper = HFSeq2Seq

    def load_tokenizer(self, source: str | Path, arch: HFSeq2SeqArchitecture) -> HFTokenizer:
        languages = {"src_lang": arch.source_lang, "tgt_lang": arch.target_lang}
        languages = {k: v for k, v in languages.items() if v is not None}
        revision = arch.revision if str(source) == arch.pretrained else None
        return HFTokenizer.load(source, revision, **languages)

    def encode_pairs(
        self, arch: HFSeq2SeqArchitecture, tok: HFTokenizer, rows: dict[str, list[str]]
    ) -> tuple[list, list]:
        sources = encode_lines(tok, [arch.source_prefix + s for s in rows["src"]])
        targets = [np.asarray(ids, dtype=np.int32) for ids in tok.encode_target(rows["tgt"])]
        return sources, targets

    def framing(self, arch: HFSeq2SeqArchitecture, tok: HFTokenizer) -> PairFraming:
        return pair_framing(tok, pretrained_config(arch).decoder_start_token_id)

    def max_positions(self, arch: HFSeq2SeqArchitecture) -> int | None:
        return context_length(pretrained_config(arch))

    def load(self, model_dir: Path, arch: Any, decoding: dict, device: str = "auto"):
        model = self.folder_model(model_dir, arch, device)
        return self.predictor(
            model, self.load_tokenizer(Path(model_dir) / HF_DIR, arch), arch, decoding
        )

    def load_exported(self, folder: Path, arch: Any, decoding: dict, device: str = "auto"):
        model = self.exported_model(folder, device)
        return self.predictor(model, self.load_tokenizer(folder, arch), arch, decoding)

    def predictor(
        self, model: HFSeq2Seq, tok: HFTokenizer, arch: HFSeq2SeqArchitecture, decoding: dict
    ) -> HFSeq2SeqPredictor:
        framing = pair_framing(tok, model.hf.config.decoder_start_token_id)
        options = {**decoding, "source_prefix": arch.source_prefix}
        return HFSeq2SeqPredictor(model, tok, framing, options)

    def transformers_pipeline(
        self, model_dir: Path, arch: Any, decoding: dict, hf_task: str
    ) -> Any:
        """The translation pipeline, with the decoding settings seqmodels evaluates with as the
        model's generation defaults and T5's task prefix as the config's `prefix` (which the
        pipeline puts before every input)."""
        predictor = self.load(model_dir, arch, decoding, device="cpu")
        hf_model = without_lora(predictor.model.hf, arch.lora)
        hf_model.config.prefix = arch.source_prefix or None
        # A pipeline has one output budget for every input: that of a long sentence.
        settings = predictor.generate_settings(LONG_SOURCE)
        for key, value in settings.items():
            setattr(hf_model.generation_config, key, value)
        # max_new_tokens governs; the pipeline still reads max_length (to warn on long inputs).
        hf_model.generation_config.max_length = context_length(hf_model.config) or 512
        return hf_pipeline(hf_task, hf_model, predictor.sp)
