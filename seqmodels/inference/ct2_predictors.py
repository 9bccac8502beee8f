"""Predictors of a CTranslate2 export (seqmodels.models.ct2_export): the interface of the
torch predictors (seqmodels.inference.predictors), decoding with CTranslate2.

seqmodels.models.folder.load_predictor picks these for a folder whose seqmodels.json names
`"runtime": "ctranslate2"`.

Beam search repeats seqmodels' own (seqmodels.inference.decoding.beam_search): the same beam
size, the same per-sentence maximum length (max_len_a * source + max_len_b, EOS not counted),
min_len and no_repeat_ngram_size, PAD and BOS never emitted. CTranslate2's length penalty is
not GNMT's (it divides by length ** alpha), so its K best hypotheses are searched on the raw
log-probability and ranked here with the GNMT penalty ((5 + |Y|) / 6) ** alpha, |Y| counting
the EOS, as beam_search ranks its finished hypotheses.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Any

import sentencepiece as spm

from seqmodels import BOS_ID, EOS_ID, PAD_ID
from seqmodels.inference.decoding import gnmt_length_penalty
from seqmodels.inference.predictors import (
    LanguageModelPredictor,
    TranslationPredictor,
    continuation_text,
)

# CTranslate2's threads for one predictor (its intra_threads); 0: its default (all cores).
DEFAULT_THREADS = 0


def ct2_device(device: str) -> str:
    """seqmodels' device names ("auto", "cpu", "cuda", "cuda:N") as CTranslate2's."""
    import ctranslate2

    if device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return device.split(":")[0]


def max_output_tokens(
    src_len: int, max_len_a: float, max_len_b: float, max_positions: int | None
) -> int:
    """The limit seqmodels' decoding sets on a source of src_len ids (its EOS included)."""
    limit = max(1, int(max_len_a * src_len + max_len_b))
    return min(limit, max_positions - 1) if max_positions is not None else limit


class CT2TranslationPredictor(TranslationPredictor):
    """A CTranslate2 Translator behind TranslationPredictor's interface (its source cut,
    batching and settings; only the decoding of a batch differs)."""

    def __init__(self, translator: Any, sp: spm.SentencePieceProcessor, decoding: dict, **kw):
        self.translator, self.sp = translator, sp
        self.max_positions: int | None = kw.get("max_positions")
        self.configure(decoding)
        self.truncated_sources = 0
        self.banned = [[sp.id_to_piece(PAD_ID)], [sp.id_to_piece(BOS_ID)]]

    def decode_batch(self, srcs: list[list[int]]) -> list[list[int]]:
        # CTranslate2 takes one maximum length per call: sentences sharing one (of equal
        # length: the batch is sorted by length) are decoded together.
        limits = [
            max_output_tokens(len(s), self.max_len_a, self.max_len_b, self.max_positions)
            for s in srcs
        ]
        out: list[list[int]] = []
        start = 0
        for limit, group in groupby(limits):
            n = len(list(group))
            out.extend(self._decode_group(srcs[start : start + n], limit))
            start += n
        return out

    def _decode_group(self, srcs: list[list[int]], limit: int) -> list[list[int]]:
        tokens = [[self.sp.id_to_piece(i) for i in s] for s in srcs]
        k = max(1, self.beam_size)
        results = self.translator.translate_batch(
            tokens,
            beam_size=k,
            num_hypotheses=k,
            length_penalty=0.0,  # raw log-probabilities: ranked with GNMT's penalty below
            max_decoding_length=limit,  # beam_search's limit (it then forces the EOS)
            min_decoding_length=self.min_len,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            suppress_sequences=self.banned,
            return_scores=True,
            return_end_token=True,
        )
        eos = self.sp.id_to_piece(EOS_ID)
        out = []
        for result in results:
            # |Y| counts the EOS, also the one beam_search forces at the maximum length.
            ranked = sorted(
                zip(result.scores, result.hypotheses, strict=True),
                key=lambda sh: (
                    -sh[0]
                    / gnmt_length_penalty(len(sh[1]) + (sh[1][-1:] != [eos]), self.length_penalty)
                ),
            )
            best = [t for t in ranked[0][1] if t != eos]
            out.append([self.sp.piece_to_id(t) for t in best])
        return out


class CT2LMPredictor(LanguageModelPredictor):
    """A CTranslate2 Generator behind the language-model interface: generation only (scoring
    stays with the torch model)."""

    def __init__(self, generator: Any, sp: spm.SentencePieceProcessor, max_context: int):
        self.generator, self.sp, self.max_context = generator, sp, max_context
        self.eos = sp.id_to_piece(EOS_ID)
        self.banned = [[sp.id_to_piece(PAD_ID)], [sp.id_to_piece(BOS_ID)]]

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 60,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_line_end: bool = False,
    ) -> list[str]:
        """As NeuralLMPredictor.generate (temperature <= 0: greedy); the prompt and what is
        generated must fit the model's context (learned positions cannot slide here)."""
        starts = [[self.eos] + self.sp.encode(p, out_type=str) for p in prompts]
        longest = max((len(s) for s in starts), default=0) + max_new_tokens
        if self.max_context is not None and longest > self.max_context:
            raise ValueError(
                f"prompt and {max_new_tokens} new tokens make {longest} positions: more than "
                f"this CTranslate2 model's {self.max_context} (use the torch version, which "
                "slides its context)"
            )
        greedy = temperature <= 0
        results = self.generator.generate_batch(
            starts,
            max_length=max_new_tokens,
            sampling_topk=1 if greedy else (top_k or 0),
            sampling_topp=top_p or 1.0,
            sampling_temperature=1.0 if greedy else temperature,
            end_token=self.eos if stop_at_line_end else [],
            suppress_sequences=self.banned,
            include_prompt_in_result=False,
            **({"random_seed": seed} if seed is not None else {}),
        )
        outputs = []
        for start, result in zip(starts, results, strict=True):
            new = [self.sp.piece_to_id(t) for t in result.sequences[0]]
            prompt = [self.sp.piece_to_id(t) for t in start[1:]]
            outputs.append(continuation_text(self.sp, prompt, new, EOS_ID))
        return outputs


def load_ct2_predictor(
    model_dir: Path, family: Any, arch: Any, decoding: dict, **options: Any
) -> TranslationPredictor | LanguageModelPredictor:
    """The predictor of a CTranslate2 folder of `family` (its task decides which) with
    `arch`; options: device ("auto"), threads (CTranslate2's intra_threads; 0: its default)."""
    import ctranslate2

    from seqmodels.files import load_sentencepiece

    model_dir = Path(model_dir)
    sp = load_sentencepiece(model_dir / "spm.model")
    where = ct2_device(options.get("device", "auto"))
    threads = int(options.get("threads", DEFAULT_THREADS))
    if family.task == "language_model":
        generator = ctranslate2.Generator(str(model_dir), device=where, intra_threads=threads)
        return CT2LMPredictor(generator, sp, family.max_context(arch))
    translator = ctranslate2.Translator(str(model_dir), device=where, intra_threads=threads)
    positions = family.max_positions(arch)
    return CT2TranslationPredictor(translator, sp, decoding, max_positions=positions)
