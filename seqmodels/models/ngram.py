"""Interpolated modified Kneser-Ney n-gram language model over integer token ids.

Estimation follows Chen & Goodman (1998) with KenLM's conventions:
- each sentence is scored as <s> w1 .. wn </s>; <s> is context only, never predicted. As in
  KenLM/SRILM there is a single <s>: near the start the usable order is capped (w1 is predicted
  from <s> alone), which is what padding the context with <s> amounts to.
- adjusted counts a(.): raw counts at the highest order and for n-grams starting with <s> (they
  cannot be extended to the left); otherwise continuation counts N1+(. w1..wk).
- three discounts D1, D2, D3+ per order from that order's count-of-counts n1..n4. If they are
  undefined or out of range (tiny corpora) the order falls back to (0.5, 1.0, 1.5), like KenLM's
  --discount_fallback.
- the unigram level is interpolated with a uniform distribution over the predictable ids, which
  are all ids in [0, vocab_size) except <s> (pad and never-seen ids included, so that every
  next-token distribution sums to exactly 1). Ids outside [0, vocab_size), and <s> inside a
  sentence, are mapped to <unk>.

Storage is a trie flattened into one sorted int64 array per order: the key of (w1..wk) is
index_of(w1..wk-1 in order k-1) * vocab_size + wk, and unigrams are dense (index = id). The children
of a context are then one contiguous key range, and finding the n-grams that end at every corpus
position takes one np.searchsorted per order (each order extends the previous order's match).
Per entry we keep alpha = (a - D(a)) / A(context) and per context gamma = sum D(a) / A(context), so
p_k(w | h) = alpha(h w) + gamma(h) * p_{k-1}(w | h'); the unigram entry keeps the full p_1(w).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sentencepiece as spm
from pydantic import Field

from seqmodels import BOS_ID, EOS_ID, UNK_ID
from seqmodels.data.splits import encode_lines, read_split
from seqmodels.files import atomic_open, load_sentencepiece
from seqmodels.inference.predictors import LanguageModelPredictor, continuation_text
from seqmodels.models.family import LANGUAGE_MODEL, ModelFamily, TrainJob
from seqmodels.settings import Settings
from seqmodels.training.settings import NoTraining

FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback defaults
ARPA_LOG10_ZERO = -99.0  # how ARPA files spell log10(0), e.g. for p(<s>)
_ARPA_CHUNK = 100_000
_CHUNK_BITS = 20  # _lookup sorts queries in chunks of 2**20
NGRAM_FILE = "ngram.npz"
Sentences = Sequence[np.ndarray] | pa.Array | pa.ChunkedArray  # arrow: a list<int> column


def _sort_with_order(q: np.ndarray, q_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(np.sort(q), a permutation that sorts q) for non-negative q below q_max.

    Packs (value, position) into one int64 when it fits and uses np.sort, which is ~9x faster
    than np.argsort on int64."""
    bits = max(len(q) - 1, 1).bit_length()
    if int(q_max).bit_length() + bits <= 63:
        packed = np.sort((q << bits) | np.arange(len(q)))
        return packed >> bits, packed & ((1 << bits) - 1)
    order = np.argsort(q)
    return q[order], order


def _lookup(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of each (non-negative) query in sorted `keys`, or -1 where absent."""
    n = len(queries)
    if len(keys) == 0 or n == 0:
        return np.full(n, -1, np.int64)
    if n <= 4096:
        j = np.searchsorted(keys, queries)
    else:  # sorted queries walk `keys` in order: several times fewer cache misses
        j = np.empty(n, np.int64)
        q_max = max(int(queries.max()), int(keys[-1])) + 1
        step = 1 << _CHUNK_BITS
        for s in range(0, n, step):
            q, order = _sort_with_order(queries[s : s + step], q_max)
            j[s + order] = np.searchsorted(keys, q)
    np.minimum(j, len(keys) - 1, out=j)
    return np.where(keys[j] == queries, j, -1)


def _unique(q: np.ndarray, q_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sorted unique keys, inverse, one occurrence index per key, counts) of q < q_max."""
    s, order = _sort_with_order(q, q_max)
    new = np.empty(len(s), bool)
    new[:1] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(s)))
    inverse = np.empty(len(q), np.int64)
    inverse[order] = np.repeat(np.arange(len(starts)), counts)
    return s[starts], inverse, order[starts], counts


def _estimate_discounts(adjusted: np.ndarray) -> np.ndarray:
    """Chen & Goodman's D1, D2, D3+ from the count-of-counts of one order's adjusted counts."""
    n1, n2, n3, n4 = (int(np.count_nonzero(adjusted == j)) for j in (1, 2, 3, 4))
    try:
        y = n1 / (n1 + 2 * n2)
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    except ZeroDivisionError:
        return np.array(FALLBACK_DISCOUNTS)
    # D(a) must lie in (0, a] so that no probability goes negative and some mass is left over.
    if not all(0 < dj <= j for j, dj in enumerate(d, 1)):
        return np.array(FALLBACK_DISCOUNTS)
    return np.array(d)


def _discount_of(adjusted: np.ndarray, discounts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], discounts])[np.minimum(adjusted, 3)]


def _map_ids(
    ids: np.ndarray, vocab_size: int, bos_id: int, unk_id: int, id_map: np.ndarray | None
) -> np.ndarray:
    """Ids outside [0, vocab_size), unlisted in an ARPA file, or <s> inside a sentence -> <unk>."""
    ids = np.where((ids >= 0) & (ids < vocab_size), ids, unk_id)
    if id_map is not None:
        ids = id_map[ids]
    return np.where(ids == bos_id, unk_id, ids)


def _previous(idx: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """idx[i - 1], or -1 where i starts a sentence (nothing precedes <s>)."""
    prev = np.empty_like(idx)
    prev[:1] = -1
    prev[1:] = idx[:-1]
    prev[pos == 0] = -1
    return prev


def _flatten(
    sentences: Sentences,
    vocab_size: int,
    *,
    bos_id: int,
    eos_id: int,
    unk_id: int,
    id_map: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All sentences as <s> w1..wn </s> back to back, and each token's position in its sentence."""
    if isinstance(sentences, pa.ChunkedArray):
        sentences = sentences.combine_chunks()
    if isinstance(sentences, pa.Array):  # list<int> column: no per-sentence Python work
        tokens = sentences.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        lengths = pc.fill_null(pc.list_value_length(sentences), 0)
        lengths = lengths.to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        lengths = np.fromiter((len(s) for s in sentences), np.int64, count=len(sentences))
        tokens = (
            np.concatenate([np.asarray(s).ravel() for s in sentences]).astype(np.int64)
            if lengths.sum() > 0
            else np.zeros(0, np.int64)
        )
    tokens = _map_ids(tokens, vocab_size, bos_id, unk_id, id_map)
    sizes = lengths + 2
    starts = np.cumsum(sizes) - sizes
    pos = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)
    seq = np.empty(len(pos), np.int64)
    inner = np.ones(len(pos), bool)
    inner[starts] = inner[starts + sizes - 1] = False
    seq[starts] = bos_id
    seq[starts + sizes - 1] = eos_id
    seq[inner] = tokens
    return seq, pos


def _write_values(f: IO[bytes], strings: pa.Array) -> None:
    """Write the values of a null-free large_string array back to back (one buffer copy)."""
    offsets = np.frombuffer(strings.buffers()[1], np.int64)
    offsets = offsets[strings.offset : strings.offset + len(strings) + 1]
    f.write(memoryview(strings.buffers()[2])[offsets[0] : offsets[-1]])


def _parse_arpa(path: Path) -> Iterator[tuple[int, pa.Array, np.ndarray, np.ndarray]]:
    """Per section: (order, tokens as strings (row-major), log10 probs, log10 backoffs or 0)."""
    data = path.read_bytes()
    # Headers are the only lines that start with a backslash (n-gram lines start with a number).
    starts = [0] if data.startswith(b"\\") else []
    i = data.find(b"\n\\")
    while i >= 0:
        starts.append(i + 1)
        i = data.find(b"\n\\", i + 1)
    declared = {int(k): int(n) for k, n in re.findall(rb"ngram\s+(\d+)\s*=\s*(\d+)", data[:4096])}
    buf = pa.py_buffer(data)
    for a, b in zip(starts, [*starts[1:], len(data)], strict=True):
        eol = data.find(b"\n", a, b)
        head = re.fullmatch(rb"\\(\d+)-grams:", data[a : b if eol < 0 else eol].strip())
        if head is None:
            continue
        k, body = int(head[1]), buf[eol + 1 : b]
        text = pa.Array.from_buffers(
            pa.large_string(), 1, [None, pa.py_buffer(np.array([0, len(body)])), body]
        )
        text.validate(full=True)  # utf-8 check before the string kernels run
        # ASCII whitespace never occurs inside a UTF-8 multi-byte character, so these are safe.
        lines = pc.ascii_trim_whitespace(pc.split_pattern(text, "\n").flatten())
        fields = pc.ascii_split_whitespace(lines.filter(pc.not_equal(lines, "")))
        n = pc.list_value_length(fields).to_numpy()
        if len(n) != declared.get(k, len(n)) or ((n != k + 1) & (n != k + 2)).any():
            raise ValueError(f"{path}: malformed or truncated \\{k}-grams section")
        lp = pc.list_element(fields, 0).cast(pa.float64()).to_numpy()
        bo = np.zeros(len(n))
        bo[n == k + 2] = pc.list_slice(fields, k + 1, k + 2).flatten().cast(pa.float64())
        yield k, pc.list_slice(fields, 1, k + 1).flatten(), lp, bo


@dataclass(eq=False)
class KneserNeyLM:
    order: int
    vocab_size: int  # number of ids incl. special ones; ids are 0 .. vocab_size - 1
    bos_id: int
    eos_id: int
    unk_id: int
    # keys[k-1]: sorted trie keys of order k (keys[0] = arange(vocab_size), dense unigrams).
    keys: list[np.ndarray] = field(repr=False)
    # alphas[0]: full p_1(w); alphas[k-1]: discounted part (a - D(a)) / A(context) for k >= 2.
    alphas: list[np.ndarray] = field(repr=False)
    # backoffs[k-1]: interpolation weight gamma of each order-k entry as a context (1 if none).
    backoffs: list[np.ndarray] = field(repr=False)
    discounts: np.ndarray = field(repr=False)  # (order, 3): D1, D2, D3+; NaN if read from ARPA
    id_map: np.ndarray | None = field(default=None, repr=False)  # ARPA: unlisted ids -> <unk>

    # ------------------------------------------------------------------ estimation
    @classmethod
    def fit(
        cls,
        sentences: Sentences,
        order: int,
        vocab_size: int,
        *,
        bos_id: int,
        eos_id: int,
        unk_id: int,
    ) -> KneserNeyLM:
        """Estimate from sentences of ids (without <s>/</s>; they are added). One sort per order:
        a 10M-token 5-gram takes ~10 s and ~2 GB on 2 cores."""
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        special = {bos_id, eos_id, unk_id}
        if len(special) != 3 or not all(0 <= i < vocab_size for i in special):
            raise ValueError("bos/eos/unk ids must be distinct and inside [0, vocab_size)")
        V = vocab_size
        seq, pos = _flatten(sentences, V, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id)

        # Pass 1: the distinct k-grams ending at each position, order by order. `idx` holds the
        # index (in its order's table) of the (k-1)-gram ending at each position, -1 if none.
        grams = []  # per order k >= 2: (keys, raw counts, starts with <s>, suffix index)
        idx = seq
        for k in range(2, order + 1):
            ctx = _previous(idx, pos)
            at = np.flatnonzero(ctx >= 0)
            n_ctx = V if k == 2 else len(grams[-1][0])
            keys, inverse, first, counts = _unique(ctx[at] * V + seq[at], n_ctx * V)
            occ = at[first]
            # <s> only ever sits at position 0, so a k-gram starts with it iff it ends at k-1;
            # its suffix (w2..wk) is the (k-1)-gram ending at the same position.
            grams.append((keys, counts, pos[occ] == k - 1, idx[occ]))
            idx = np.full(len(seq), -1, np.int64)
            idx[at] = inverse
        del idx

        # Pass 2: adjusted counts, top down. Every k-gram not starting with <s> has a left
        # neighbour, so its continuation count is the number of (k+1)-gram types it ends.
        adjusted: list[np.ndarray] = [np.zeros(0, np.int64)] * order
        if order == 1:
            adjusted[0] = np.bincount(seq[pos > 0], minlength=V)
        else:
            adjusted[order - 1] = grams[-1][1]
            for k in range(order - 1, 0, -1):
                a = np.bincount(grams[k - 1][3], minlength=V if k == 1 else len(grams[k - 2][0]))
                if k >= 2:
                    _, counts, starts_bos, _ = grams[k - 2]
                    a[starts_bos] = counts[starts_bos]
                adjusted[k - 1] = a
        discounts = np.stack([_estimate_discounts(a) for a in adjusted])

        # Pass 3: alphas and interpolation weights.
        a1 = adjusted[0].astype(np.float64)
        d1 = _discount_of(adjusted[0], discounts[0])
        total = a1.sum()
        n_predictable = V - 1  # every id except <s>
        if total > 0:
            p1 = (a1 - d1) / total + d1.sum() / total / n_predictable
        else:
            p1 = np.full(V, 1.0 / n_predictable)
        p1[bos_id] = 0.0
        keys_l, alphas, backoffs = [np.arange(V, dtype=np.int64)], [p1], []
        for k in range(2, order + 1):
            keys = grams[k - 2][0]
            a = adjusted[k - 1]
            d = _discount_of(a, discounts[k - 1])
            parent = keys // V
            n_parents = len(keys_l[-1])
            mass = np.bincount(parent, weights=a, minlength=n_parents)
            left = np.bincount(parent, weights=d, minlength=n_parents)
            has = mass > 0
            gamma = np.ones(n_parents)
            gamma[has] = left[has] / mass[has]
            backoffs.append(gamma)
            alphas.append((a - d) / mass[parent])
            keys_l.append(keys)
        return cls(order, V, bos_id, eos_id, unk_id, keys_l, alphas, backoffs, discounts)

    # ------------------------------------------------------------------ scoring
    def _map_ids(self, ids: np.ndarray) -> np.ndarray:
        return _map_ids(ids, self.vocab_size, self.bos_id, self.unk_id, self.id_map)

    def _context(self, context: Sequence[int]) -> np.ndarray:
        """Ids of the usable context: from the last <s> on, at most order - 1 tokens."""
        h = np.asarray(context, dtype=np.int64).ravel()
        starts = np.flatnonzero(h == self.bos_id)
        if len(starts):
            h = np.concatenate([[self.bos_id], self._map_ids(h[starts[-1] + 1 :])])
        else:
            h = self._map_ids(h)
        return h[max(len(h) - self.order + 1, 0) :] if self.order > 1 else h[:0]

    def _find_rows(self, rows: np.ndarray) -> np.ndarray:
        """Table index of each row of ids (an n-gram of order rows.shape[1]), -1 if absent."""
        idx = rows[:, 0].astype(np.int64)
        for j in range(1, rows.shape[1]):
            ok = np.flatnonzero(idx >= 0)
            found = np.full(len(idx), -1, np.int64)
            found[ok] = _lookup(self.keys[j], idx[ok] * self.vocab_size + rows[ok, j])
            idx = found
        return idx

    def _row_probs(self, rows: np.ndarray) -> np.ndarray:
        """p(last id | the ids before it) for each row; no <s>/<unk> mapping is applied."""
        n, V = rows.shape[1], self.vocab_size
        w = rows[:, -1].astype(np.int64)
        p = self.alphas[0][w].copy()
        for k in range(2, min(n, self.order) + 1):
            c = self._find_rows(rows[:, n - k : n - 1])
            at = np.flatnonzero(c >= 0)
            p[at] *= self.backoffs[k - 2][c[at]]
            e = _lookup(self.keys[k - 1], c[at] * V + w[at])
            hit = e >= 0
            p[at[hit]] += self.alphas[k - 1][e[hit]]
        return p

    def _lower_probs(self, rows: np.ndarray, p_prev: np.ndarray) -> np.ndarray:
        """p(w_k | w_2 .. w_k-1) for order-k rows, given the full probabilities p_prev of every
        order k-1 entry: a lookup where the suffix is listed (always, for fitted models)."""
        suffix = self._find_rows(rows[:, 1:])
        lower = np.where(suffix >= 0, p_prev[suffix], 0.0)
        missing = np.flatnonzero(suffix < 0)
        lower[missing] = self._row_probs(rows[missing, 1:])
        return lower

    def _score(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """p(seq[i] | its history) at every position (meaningless where pos == 0)."""
        V = self.vocab_size
        p = self.alphas[0][seq]
        idx = seq  # table index of the (k-1)-gram ending at each position
        for k in range(2, self.order + 1):
            ctx = _previous(idx, pos)
            at = np.flatnonzero(ctx >= 0)
            if len(at) == 0:  # no context of this order anywhere, so none of higher ones
                break
            c = ctx[at]
            e = _lookup(self.keys[k - 1], c * V + seq[at])
            p[at] *= self.backoffs[k - 2][c]
            hit = e >= 0
            p[at[hit]] += self.alphas[k - 1][e[hit]]
            idx = np.full(len(seq), -1, np.int64)
            idx[at] = e
        return p

    def sentence_logprobs(self, sentences: Sentences) -> np.ndarray:
        """Natural-log probability of every predicted token (w1..wn and </s> of each sentence)."""
        seq, pos = _flatten(
            sentences,
            self.vocab_size,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            unk_id=self.unk_id,
            id_map=self.id_map,
        )
        with np.errstate(divide="ignore"):
            return np.log(self._score(seq, pos)[pos > 0])

    def total_nll(self, sentences: Sentences) -> tuple[float, int]:
        """(negative log-likelihood in nats, number of predicted tokens incl. one </s> each)."""
        lp = self.sentence_logprobs(sentences)
        return float(-lp.sum()), len(lp)

    def perplexity(self, sentences: Sentences) -> float:
        nll, n = self.total_nll(sentences)
        return float(np.exp(nll / max(n, 1)))

    def prob(self, context: Sequence[int], token: int) -> float:
        """p(token | context). A context starting with <s> is a sentence start; without one it is
        taken to be mid-sentence (only its last order - 1 ids matter either way)."""
        if token == self.bos_id:
            return 0.0
        row = np.concatenate([self._context(context), self._map_ids(np.array([token]))])
        return float(self._row_probs(row[None])[0])

    def next_token_probs(self, context: Sequence[int]) -> np.ndarray:
        """The whole next-token distribution p(. | context), shape (vocab_size,)."""
        V, h = self.vocab_size, self._context(context)
        p = self.alphas[0].copy()
        for k in range(2, min(len(h) + 1, self.order) + 1):
            c = int(self._find_rows(h[None, len(h) - k + 1 :])[0])
            if c < 0:
                continue
            keys = self.keys[k - 1]
            lo, hi = np.searchsorted(keys, [c * V, (c + 1) * V])
            p *= self.backoffs[k - 2][c]
            p[keys[lo:hi] % V] += self.alphas[k - 1][lo:hi]
        return p

    def sample(
        self,
        n: int = 1,
        prompt: Sequence[int] = (),
        max_tokens: int = 100,
        rng: np.random.Generator | int | None = None,
    ) -> list[np.ndarray]:
        """n continuations of <s> + prompt, each stopping before </s> (not included) or after
        max_tokens ids. Pass a seeded Generator (or a seed) for reproducible output."""
        rng = np.random.default_rng(rng)
        out = []
        for _ in range(n):
            history = [self.bos_id, *(int(t) for t in prompt)]
            new: list[int] = []
            for _ in range(max_tokens):
                cdf = np.cumsum(self.next_token_probs(history[-self.order :]))
                # side="right" can never pick a zero-probability id (e.g. <s>)
                w = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
                w = min(w, self.vocab_size - 1)
                if w == self.eos_id:
                    break
                new.append(w)
                history.append(w)
            out.append(np.array(new, dtype=np.int64))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        """Uncompressed .npz (loads at disk speed), written atomically."""
        meta = [self.order, self.vocab_size, self.bos_id, self.eos_id, self.unk_id]
        arrays: dict[str, Any] = {"meta": np.array(meta), "discounts": self.discounts}
        arrays |= {f"keys{k}": x for k, x in enumerate(self.keys[1:], 2)}  # keys1 = arange
        arrays |= {f"alpha{k}": x for k, x in enumerate(self.alphas, 1)}
        arrays |= {f"backoff{k}": x for k, x in enumerate(self.backoffs, 1)}
        if self.id_map is not None:
            arrays["id_map"] = self.id_map
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> KneserNeyLM:
        with np.load(path, allow_pickle=False) as z:
            order, V, bos, eos, unk = (int(x) for x in z["meta"])
            keys = [np.arange(V, dtype=np.int64)] + [z[f"keys{k}"] for k in range(2, order + 1)]
            alphas = [z[f"alpha{k}"] for k in range(1, order + 1)]
            backoffs = [z[f"backoff{k}"] for k in range(1, order)]
            id_map = z["id_map"] if "id_map" in z.files else None
            return cls(order, V, bos, eos, unk, keys, alphas, backoffs, z["discounts"], id_map)

    def write_arpa(self, path: Path, id_to_token: Callable[[int], str]) -> None:
        """Standard backoff-form ARPA file (log10), readable by KenLM and SRILM; atomic.

        <s>, </s> and <unk> are always written under those names. Every id is listed as a unigram
        (<s> with log10 p = -99). Numbers are printed at float32 precision (~7 digits), as KenLM
        does; lines are built with pyarrow string kernels, not per-line Python."""
        V = self.vocab_size
        names = [id_to_token(i) for i in range(V)]
        for i, name in ((self.bos_id, "<s>"), (self.eos_id, "</s>"), (self.unk_id, "<unk>")):
            names[i] = name
        if len(set(names)) != V or any(not s or re.search(r"\s", s, re.ASCII) for s in names):
            raise ValueError("id_to_token must give distinct, non-empty, whitespace-free tokens")
        names_pa = pa.array(names, pa.large_string())
        space, tab, nl, empty = (pa.scalar(c, pa.large_string()) for c in (" ", "\t", "\n", ""))

        def numbers(x: np.ndarray) -> pa.Array:
            return pa.array(x.astype(np.float32)).cast(pa.large_string())

        with atomic_open(path, "wb") as f:
            counts = "".join(
                f"ngram {k}={len(self.keys[k - 1])}\n" for k in range(1, self.order + 1)
            )
            f.write(f"\\data\\\n{counts}".encode())
            rows = np.arange(V, dtype=np.int32)[:, None]
            p_full = self.alphas[0]
            for k in range(1, self.order + 1):
                if k > 1:
                    # ARPA stores fully interpolated probabilities: alpha + gamma * p_lower.
                    keys = self.keys[k - 1]
                    parent = keys // V
                    rows = np.column_stack([rows[parent], (keys % V).astype(np.int32)])
                    lower = self._lower_probs(rows, p_full)
                    p_full = self.alphas[k - 1] + self.backoffs[k - 2][parent] * lower
                with np.errstate(divide="ignore"):
                    logp = np.maximum(np.log10(p_full), ARPA_LOG10_ZERO)
                    logb = np.log10(self.backoffs[k - 1]) if k < self.order else None
                f.write(f"\n\\{k}-grams:\n".encode())
                for s in range(0, len(rows), _ARPA_CHUNK):
                    e = s + _ARPA_CHUNK
                    gram = [names_pa.take(pa.array(rows[s:e, j])) for j in range(k)]
                    cols = [numbers(logp[s:e]), pc.binary_join_element_wise(*gram, space)]
                    if logb is not None:
                        cols.append(numbers(logb[s:e]))
                    line = pc.binary_join_element_wise(*cols, tab)
                    _write_values(f, pc.binary_join_element_wise(line, empty, nl))
            f.write(b"\n\\end\\\n")

    @classmethod
    def read_arpa(
        cls,
        path: Path,
        token_to_id: Callable[[str], int],
        vocab_size: int,
        *,
        bos_id: int,
        eos_id: int,
        unk_id: int,
    ) -> KneserNeyLM:
        """Load any backoff ARPA file (every n-gram's prefix must be listed, as KenLM and SRILM
        write them) into the same trie. Scoring then follows ARPA backoff semantics exactly,
        since alpha = p_arpa(h w) - bow(h) * p(w | h') turns a backoff model into interpolated
        form. Ids in [0, vocab_size) missing from the unigrams score as <unk>, like in KenLM
        (next_token_probs gives them 0, so sampling never produces them)."""
        special = {"<s>": bos_id, "</s>": eos_id, "<unk>": unk_id}

        def to_id(tok: str) -> int:
            i = special[tok] if tok in special else int(token_to_id(tok))
            if not 0 <= i < vocab_size:
                raise ValueError(f"{path}: token {tok!r} maps to id {i}, outside the vocab")
            return i

        sections = {}
        for k, tokens, lp, bo in _parse_arpa(Path(path)):
            words = pc.dictionary_encode(tokens)  # map each distinct token string once
            lut = np.array([to_id(t) for t in words.dictionary.to_pylist()], np.int64)
            sections[k] = (lut[words.indices.to_numpy()], lp, bo)
        if not sections or sorted(sections) != list(range(1, max(sections) + 1)):
            raise ValueError(f"{path}: no ARPA n-gram sections 1..N found")
        order, V = max(sections), vocab_size

        ids1, lp1, bo1 = sections[1]
        listed = np.zeros(V, bool)
        listed[ids1] = True
        p1 = np.zeros(V)
        p1[ids1] = 10.0**lp1
        p1[bos_id] = 0.0
        id_map = np.where(listed | (np.arange(V) == bos_id), np.arange(V), unk_id)
        trie = [np.arange(V, dtype=np.int64)], [p1], []
        model = cls(order, V, bos_id, eos_id, unk_id, *trie, np.full((order, 3), np.nan))
        model.id_map = None if (id_map == np.arange(V)).all() else id_map
        if order > 1:
            model.backoffs.append(np.ones(V))
            model.backoffs[0][ids1] = 10.0**bo1
        p_arpa = p1  # ARPA probabilities of the previous order, in table order
        for k in range(2, order + 1):
            ids, lp, bo = sections[k]
            rows = ids.reshape(-1, k)
            parent = model._find_rows(rows[:, :-1])
            if (parent < 0).any():
                raise ValueError(f"{path}: some {k}-grams lack their prefix {k - 1}-gram")
            keys = parent * V + rows[:, -1]
            srt = np.argsort(keys)
            keys, rows, parent = keys[srt], rows[srt], parent[srt]
            if (np.diff(keys) == 0).any():
                raise ValueError(f"{path}: duplicate {k}-grams")
            lower = model._lower_probs(rows, p_arpa)  # uses orders < k only
            p_arpa = 10.0 ** lp[srt]
            alpha = p_arpa - model.backoffs[k - 2][parent] * lower
            model.keys.append(keys)
            model.alphas.append(alpha)
            if k < order:
                model.backoffs.append(10.0 ** bo[srt])
        return model


# --- the n-gram family ------------------------------------------------------------------


class NgramArchitecture(Settings):
    order: int = Field(default=5, ge=1, le=10)


class NgramPredictor(LanguageModelPredictor):
    def __init__(self, model: KneserNeyLM, sp: spm.SentencePieceProcessor):
        self.model, self.sp = model, sp

    def total_nll(self, lines: list[str]) -> tuple[float, int]:
        return self.model.total_nll(
            [np.asarray(ids, dtype=np.int64) for ids in self.sp.encode(list(lines))]
        )

    def line_nll(self, lines: list[str]) -> np.ndarray:
        sentences = [np.asarray(ids, dtype=np.int64) for ids in self.sp.encode(list(lines))]
        token_lp = self.model.sentence_logprobs(sentences)  # each sentence's tokens + </s>
        starts = np.cumsum([0, *[len(s) + 1 for s in sentences[:-1]]])
        return -np.add.reduceat(token_lp, starts)

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 60,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        **_: Any,
    ) -> list[str]:
        # The n-gram model samples from its own distribution; temperature/top-k do not apply.
        # It samples a line at a time, so a continuation runs on across line ends.
        rng = np.random.default_rng(seed)
        outputs = []
        for prompt in prompts:
            prompt_ids = self.sp.encode(prompt)
            line, new = list(prompt_ids), []
            while len(new) < max_new_tokens:
                budget = max_new_tokens - len(new)
                sampled = self.model.sample(1, line, budget, rng)[0].tolist()
                new += sampled
                if len(sampled) == budget:
                    break
                new.append(EOS_ID)  # the line ended: the next one starts from <s>
                line = []
            outputs.append(continuation_text(self.sp, prompt_ids, new))
        return outputs


class NgramFamily(ModelFamily):
    """Interpolated modified Kneser-Ney over SentencePiece pieces: counted, not trained."""

    task = LANGUAGE_MODEL
    Architecture = NgramArchitecture
    Training = NoTraining

    def train(self, arch: NgramArchitecture, training: NoTraining, job: TrainJob) -> dict:
        sp = load_sentencepiece(job.spm_model)
        sentences = encode_lines(sp, read_split(job.parquet, "train", ["text"])["text"])
        started = time.perf_counter()
        model = KneserNeyLM.fit(
            sentences, arch.order, sp.vocab_size(), bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID
        )
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
        model.save(Path(job.out_dir) / NGRAM_FILE)
        summary: dict[str, Any] = {
            "train_time_s": time.perf_counter() - started,
            "n_parameters": int(sum(len(k) for k in model.keys)),  # stored n-grams
            "train_tokens": int(sum(len(s) + 1 for s in sentences)),
            "device": "cpu",
        }
        valid = encode_lines(sp, read_split(job.parquet, "valid", ["text"])["text"])
        if valid:
            nll, n = model.total_nll(valid)
            summary["best_valid_loss"] = nll / n
        return summary

    def load(self, model_dir: Path, arch: NgramArchitecture, decoding: dict, device: str = "auto"):
        model = KneserNeyLM.load(Path(model_dir) / NGRAM_FILE)
        return NgramPredictor(model, load_sentencepiece(Path(model_dir) / "spm.model"))
