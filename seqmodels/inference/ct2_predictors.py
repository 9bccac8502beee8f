"""Predictors of a CTranslate2 export (seqmodels.models.ct2_export): the interface of the
torch predictors (seqmodels.inference.predictors), decoding with CTranslate2.

seqmodels.models.folder.load_predictor picks these for a folder whose seqmodels.json names
`"runtime": "ctranslate2"`.

Beam search repeats seqmodels' own (seqmodels.inference.decoding.beam_search): the same beam
size, the same per-sentence maximum length (max_len_a * source + max_len_b, EOS not counted),
min_len and no_repeat_ngram_size, PAD and BOS never emitted. Both search as fairseq does
(the top 2K candidates; those ending in EOS among the top K finish; a sentence is done at K
finished). Three differences of CTranslate2's are undone here:
- its length penalty is not GNMT's (it divides by length ** alpha): its K hypotheses are
  taken with their log-probability and ranked with the GNMT penalty ((5 + |Y|) / 6) ** alpha,
  |Y| counting the EOS, as beam_search ranks its finished hypotheses;
- with a length penalty of 0 it stops once the top beam ends (not used);
- at the maximum length it keeps its best K candidates, EOS or not, where beam_search forces
  the EOS: those hypotheses get the EOS, re-scored with CTranslate2's score_batch.
On the Multi30k test set with a trained model (tests/test_export_ctranslate2.py), float32
gives the same string as beam_search for 99.7% of sentences; without the re-scoring, 89%.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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

# How a CTranslate2 predictor spreads over the machine, for `mlflow models serve` and
# `seqmodels translate|generate` (which take no such option): see CT2Layout.
REPLICAS_ENV = "SEQMODELS_CT2_REPLICAS"
THREADS_ENV = "SEQMODELS_CT2_THREADS"


@dataclass(frozen=True)
class CT2Layout:
    """`replicas` copies of the model (CTranslate2's inter_threads) decoding shares of a batch
    side by side, sharing `threads` CPU threads (0: the cores this process may run on, not
    CTranslate2's own default of 4 threads). One replica of all the threads is the lowest
    latency for one sentence; for batches, replicas are CTranslate2's way to use the cores: two
    replicas of one thread decoded 256 sentences 1.3-1.6x faster than one translator of two
    threads on a 2-core CPU (bench/ct2_serving.py, BENCHMARKS.md). On a GPU, replicas are
    copies of the model on the same device, each decoding its share of a batch on its own
    stream (CTranslate2's inter_threads there); not measured here."""

    replicas: int = 1
    threads: int = 0

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.threads < 0:
            raise ValueError(
                f"CTranslate2 layout: replicas ({REPLICAS_ENV}) must be >= 1 and threads "
                f"({THREADS_ENV}) >= 0; got replicas={self.replicas}, threads={self.threads}"
            )
        if 0 < self.threads < self.replicas:
            raise ValueError(
                f"CTranslate2 layout: {self.threads} threads ({THREADS_ENV}) cannot run "
                f"{self.replicas} replicas ({REPLICAS_ENV}): each needs a thread of its own"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CT2Layout:
        """The layout SEQMODELS_CT2_REPLICAS and SEQMODELS_CT2_THREADS set (default 1, 0)."""
        environ = os.environ if environ is None else environ
        values = {}
        for field, name, least in (("replicas", REPLICAS_ENV, 1), ("threads", THREADS_ENV, 0)):
            raw = environ.get(name, "").strip()
            if not raw:
                continue
            try:
                value: int | None = int(raw)
            except ValueError:
                value = None
            if value is None or value < least:
                raise ValueError(f"{name}={raw!r}: must be a whole number >= {least}")
            values[field] = value
        return cls(**values)

    def runtime_options(self) -> dict[str, int]:
        """inter_threads and intra_threads for a ctranslate2.Translator or Generator."""
        threads = self.threads or usable_cores()
        return {"inter_threads": self.replicas, "intra_threads": max(1, threads // self.replicas)}

    def max_batch_size(self, n: int) -> int:
        """CTranslate2's max_batch_size for n inputs: a share for each replica (0: no split)."""
        return 0 if self.replicas == 1 else math.ceil(n / self.replicas)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's CPU set), not the
    host's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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
        self.layout: CT2Layout = kw.get("layout") or CT2Layout()
        self.configure(decoding)
        self.truncated_sources = 0
        self.banned = [[sp.id_to_piece(PAD_ID)], [sp.id_to_piece(BOS_ID)]]

    def decode_batch(self, srcs: list[list[int]]) -> list[list[int]]:
        # CTranslate2 takes one maximum length per call: sentences sharing one (of equal
        # length: the batch is sorted by length) are decoded together. Every group is queued
        # before any is waited for, so that several replicas decode groups side by side.
        limits = [
            max_output_tokens(len(s), self.max_len_a, self.max_len_b, self.max_positions)
            for s in srcs
        ]
        groups: list[tuple[list[list[str]], list[Any]]] = []
        try:
            start = 0
            for limit, group in groupby(limits):
                n = len(list(group))
                tokens = [[self.sp.id_to_piece(i) for i in s] for s in srcs[start : start + n]]
                groups.append((tokens, self._queue_search(tokens, limit)))
                start += n
            out: list[list[int]] = []
            for tokens, queued in groups:
                out.extend(self._best_hypotheses(tokens, [r.result() for r in queued]))
            return out
        except BaseException:
            # Wait out what is still queued, so that the next request does not queue behind
            # work whose results nobody reads; the first error is the one raised.
            for _, queued in groups:
                for result in queued:
                    with contextlib.suppress(Exception):
                        result.result()
            raise

    def _queue_search(self, tokens: list[list[str]], limit: int) -> list[Any]:
        """Queue the beam search of one group (CTranslate2's asynchronous results)."""
        k = max(1, self.beam_size)
        return self.translator.translate_batch(
            tokens,
            max_batch_size=self.layout.max_batch_size(len(tokens)),
            asynchronous=True,
            beam_size=k,
            num_hypotheses=k,
            # Not 0: at 0 CTranslate2 stops a sentence once its top beam ends, before K
            # hypotheses have. It divides each final score by len(hyp) ** length_penalty,
            # undone below, and the hypotheses are ranked with GNMT's penalty.
            length_penalty=1.0,
            max_decoding_length=limit,  # see _scored_hypotheses
            min_decoding_length=self.min_len,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            suppress_sequences=self.banned,
            return_scores=True,
            return_end_token=True,
        )

    def _best_hypotheses(self, tokens: list[list[str]], results: list[Any]) -> list[list[int]]:
        """The output ids beam_search would pick from each source's K hypotheses."""
        hypotheses = [self._scored_hypotheses(r) for r in results]
        self._score_forced_ends(tokens, hypotheses)
        out = []
        for scored in hypotheses:
            # Ranked as beam_search ranks finished hypotheses; |Y| counts the EOS.
            _, best = max(
                scored, key=lambda sh: sh[0] / gnmt_length_penalty(len(sh[1]), self.length_penalty)
            )
            out.append([self.sp.piece_to_id(t) for t in best[:-1]])
        return out

    def _scored_hypotheses(self, result: Any) -> list[tuple[float | None, list[str]]]:
        """(log-probability, pieces ending in EOS) of each hypothesis. beam_search lets a beam
        reach `limit` tokens and then forces the EOS; CTranslate2 ends its search at `limit`
        tokens, keeping its best K candidates of that last step whether EOS or not. Such a
        hypothesis gets the EOS here, its score (with the EOS's) left to _score_forced_ends
        (None)."""
        eos = self.sp.id_to_piece(EOS_ID)
        scored: list[tuple[float | None, list[str]]] = []
        for score, hyp in zip(result.scores, result.hypotheses, strict=True):
            if hyp[-1] == eos:
                scored.append((score * len(hyp), hyp))  # CTranslate2 divided by len(hyp)
            else:
                scored.append((None, [*hyp, eos]))
        return scored

    def _score_forced_ends(
        self, sources: list[list[str]], hypotheses: list[list[tuple[float | None, list[str]]]]
    ) -> None:
        """Fill in, in place, the log-probability of the hypotheses whose EOS was forced."""
        todo = [
            (i, j) for i, scored in enumerate(hypotheses) for j, (s, _) in enumerate(scored)
            if s is None
        ]  # fmt: skip
        if not todo:
            return
        results = self.translator.score_batch(
            [sources[i] for i, _ in todo],
            [hypotheses[i][j][1][:-1] for i, j in todo],
            max_batch_size=self.layout.max_batch_size(len(todo)),
        )  # score_batch appends the EOS and scores it too
        for (i, j), result in zip(todo, results, strict=True):
            hypotheses[i][j] = (sum(result.log_probs), hypotheses[i][j][1])


class CT2LMPredictor(LanguageModelPredictor):
    """A CTranslate2 Generator behind the language-model interface: generation only (scoring
    stays with the torch model). `new_generator()` builds the Generator (see `generate` for
    why a seeded call needs a fresh one)."""

    def __init__(
        self,
        new_generator: Callable[[], Any],
        sp: spm.SentencePieceProcessor,
        max_context: int,
        layout: CT2Layout | None = None,
    ):
        self.new_generator, self.sp, self.max_context = new_generator, sp, max_context
        self.generator = new_generator()
        self.layout = layout or CT2Layout()
        self.eos = sp.id_to_piece(EOS_ID)
        self.banned = [[sp.id_to_piece(PAD_ID)], [sp.id_to_piece(BOS_ID)]]

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 60,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_line_end: bool = False,
    ) -> list[str]:
        """As NeuralLMPredictor.generate (temperature <= 0: greedy); the prompt and what is
        generated must fit the model's context (learned positions cannot slide here).

        `seed`: generate_batch takes none, and CTranslate2 seeds each worker thread's random
        generator once, at its first draw, from the global seed (set_random_seed). So a
        seeded call sets that seed and samples with a Generator of its own (loaded again:
        new threads, freshly seeded), its whole batch on one replica: the same prompts and
        seed give the same continuations. Unseeded calls share the loaded Generator."""
        starts = [[self.eos] + self.sp.encode(p, out_type=str) for p in prompts]
        longest = max((len(s) for s in starts), default=0) + max_new_tokens
        if self.max_context is not None and longest > self.max_context:
            raise ValueError(
                f"prompt and {max_new_tokens} new tokens make {longest} positions: more than "
                f"this CTranslate2 model's {self.max_context} (use the torch version, which "
                "slides its context)"
            )
        greedy = temperature <= 0
        generator, share = self.generator, self.layout.max_batch_size(len(starts))
        if seed is not None and not greedy:
            import ctranslate2

            ctranslate2.set_random_seed(seed)
            generator, share = self.new_generator(), 0
        results = generator.generate_batch(
            starts,
            max_batch_size=share,
            max_length=max_new_tokens,
            sampling_topk=1 if greedy else (top_k or 0),
            sampling_topp=top_p or 1.0,
            sampling_temperature=1.0 if greedy else temperature,
            end_token=self.eos if stop_at_line_end else [],
            suppress_sequences=self.banned,
            include_prompt_in_result=False,
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
    `arch`; options: device ("auto"), layout (a CT2Layout; default: CT2Layout.from_env())."""
    import ctranslate2

    from seqmodels.files import load_sentencepiece

    model_dir = Path(model_dir)
    sp = load_sentencepiece(model_dir / "spm.model")
    where = ct2_device(options.get("device", "auto"))
    layout = options.get("layout") or CT2Layout.from_env()
    runtime = {"device": where, **layout.runtime_options()}
    if family.task == "language_model":

        def new_generator() -> Any:
            return ctranslate2.Generator(str(model_dir), **runtime)

        return CT2LMPredictor(new_generator, sp, family.max_context(arch), layout)
    translator = ctranslate2.Translator(str(model_dir), **runtime)
    positions = family.max_positions(arch)
    return CT2TranslationPredictor(translator, sp, decoding, max_positions=positions, layout=layout)
