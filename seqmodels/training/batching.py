"""Training and validation batches for LMs (token stream) and seq2seq (sentence pairs).

Training batch iterators are objects with state_dict/load_state_dict, so a checkpoint can
record the data position and a resumed run sees exactly the batches an uninterrupted run
would. Under data parallelism every rank draws the same global batch from the same RNG and
keeps its own slice (rows rank::world), so the global batch does not depend on world size.

An iterator yields (batch, n_tokens): a batch is (inputs..., targets) and n_tokens the
number of predicted (non-pad) target tokens of this rank's slice. n_tokens == 0 marks a
placeholder slice (a global batch with fewer sentences than ranks): the trainer runs it
with zero weight, so every rank still joins the gradient all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seqmodels import BOS_ID, EOS_ID, PAD_ID
from seqmodels.training.checkpoint import numpy_rng_state, set_numpy_rng_state

Batch = tuple[torch.Tensor, ...]
IGNORE_TARGET = -100  # LM target left out of the loss (torch's default ignore_index)


# --- language models --------------------------------------------------------------------


class LMBatches:
    """Random contiguous windows of block+1 tokens (nanoGPT): x = w[:-1], y = w[1:]."""

    def __init__(
        self,
        ids: np.ndarray,
        block: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world: int = 1,
    ):
        if batch_size < world:
            raise ValueError(f"{batch_size} windows per batch cannot be split over {world} ranks")
        self.ids, self.block, self.batch_size = ids, block, batch_size
        self.rank, self.world = rank, world
        self.rng = np.random.default_rng(seed)
        self.offsets = np.arange(block + 1)

    def __iter__(self) -> LMBatches:
        return self

    def __next__(self) -> tuple[Batch, int]:
        starts = self.rng.integers(0, len(self.ids) - self.block, size=self.batch_size)
        starts = starts[self.rank :: self.world]
        w = torch.from_numpy(self.ids[starts[:, None] + self.offsets].astype(np.int64))
        return (w[:, :-1], w[:, 1:]), len(starts) * self.block

    def state_dict(self) -> dict:
        return {"rng": numpy_rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        set_numpy_rng_state(self.rng, state["rng"])


def lm_valid_batches(ids: np.ndarray, block: int, batch_size: int) -> list[Batch]:
    """Non-overlapping windows covering every validation token once (last one padded: inputs
    with PAD_ID, targets with IGNORE_TARGET, since a tokenizer other than SentencePiece may
    use PAD_ID for a real token)."""
    windows_x, windows_y = [], []
    for s in range(0, len(ids) - 1, block):
        x = np.full(block, PAD_ID, dtype=np.int64)
        y = np.full(block, IGNORE_TARGET, dtype=np.int64)
        chunk = ids[s : s + block + 1]
        x[: len(chunk) - 1] = chunk[:-1]
        y[: len(chunk) - 1] = chunk[1:]
        windows_x.append(x)
        windows_y.append(y)
    batches = []
    for i in range(0, len(windows_x), batch_size):
        xs = torch.from_numpy(np.stack(windows_x[i : i + batch_size]))
        ys = torch.from_numpy(np.stack(windows_y[i : i + batch_size]))
        batches.append((xs, ys))
    return batches


@dataclass(frozen=True)
class Masking:
    """BERT's masked-LM corruption (Devlin et al. 2019): `probability` of the ordinary tokens
    are selected; of those 80% become the mask token, 10% a random token, 10% stay."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]  # never selected (cls, sep, pad...)
    probability: float = 0.15
    seed: int = 0


def mask_tokens(x: torch.Tensor, real: torch.Tensor, masking: Masking, index: int) -> Batch:
    """(corrupted x, labels) for batch number `index`: the same index always gives the same
    masking (exact resume), another index another. Labels are the original ids at the
    selected positions and IGNORE_TARGET elsewhere; `real` marks the non-padding positions."""
    gen = torch.Generator().manual_seed(masking.seed * 1_000_003 + index)
    chance, kind = torch.rand(x.shape, generator=gen), torch.rand(x.shape, generator=gen)
    random_ids = torch.randint(masking.vocab_size, x.shape, generator=gen)
    ordinary = real & ~torch.isin(x, torch.tensor(masking.special_ids, dtype=x.dtype))
    selected = ordinary & (chance < masking.probability)
    labels = torch.where(selected, x, torch.full_like(x, IGNORE_TARGET))
    corrupted = torch.where(selected & (kind < 0.8), torch.full_like(x, masking.mask_id), x)
    corrupted = torch.where(selected & (kind >= 0.8) & (kind < 0.9), random_ids, corrupted)
    return corrupted, labels


class MaskedLMBatches:
    """LM windows (LMBatches) corrupted for a masked LM, dynamically: every batch gets a new
    masking. n_tokens is the number of selected (predicted) positions."""

    def __init__(self, windows: LMBatches, masking: Masking) -> None:
        self.windows, self.masking, self.index = windows, masking, 0

    def __iter__(self) -> MaskedLMBatches:
        return self

    def __next__(self) -> tuple[Batch, int]:
        (x, _), _ = next(self.windows)
        corrupted, labels = mask_tokens(
            x, torch.ones_like(x, dtype=torch.bool), self.masking, self.index
        )
        self.index += 1
        return (corrupted, labels), int((labels != IGNORE_TARGET).sum())

    def state_dict(self) -> dict:
        return {"windows": self.windows.state_dict(), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state["windows"])
        self.index = state["index"]


def masked_valid_batches(batches: list[Batch], masking: Masking) -> list[Batch]:
    """Validation windows (lm_valid_batches) with one fixed masking (indices from 2**40: never
    a training batch's)."""
    return [
        mask_tokens(x, y != IGNORE_TARGET, masking, (1 << 40) + i)
        for i, (x, y) in enumerate(batches)
    ]


# --- translation models -----------------------------------------------------------------


@dataclass(frozen=True)
class PairFraming:
    """The ids around a pair's tokens, and the padding id. The defaults are SentencePiece's
    conventions (src + [EOS]; target [BOS] + tgt + [EOS]); a pretrained checkpoint brings its
    own (T5: src + </s>, decoder start <pad>; mBART: language codes)."""

    src_prefix: tuple[int, ...] = ()
    src_suffix: tuple[int, ...] = (EOS_ID,)
    tgt_prefix: tuple[int, ...] = (BOS_ID,)  # the decoder's start token, then any label prefix
    tgt_suffix: tuple[int, ...] = (EOS_ID,)
    pad_id: int = PAD_ID

    def source_room(self, max_len: int) -> int:
        """Source tokens that fit in max_len positions with the framing."""
        return max_len - len(self.src_prefix) - len(self.src_suffix)

    def target_room(self, max_len: int) -> int:
        """Target tokens that fit: the decoder sees tgt_prefix + tgt, predicts the rest."""
        return max_len - (len(self.tgt_prefix) - 1) - len(self.tgt_suffix)


def truncate_sources(sources: list, max_tokens: int | None) -> tuple[list, int]:
    """Sources cut to their first `max_tokens` tokens (None: as they are), and how many were
    cut. A summarisation source (a long email) is cut rather than its pair skipped."""
    if max_tokens is None:
        return list(sources), 0
    cut = sum(len(s) > max_tokens for s in sources)
    return [s[:max_tokens] for s in sources], int(cut)


def prepare_pairs(
    pairs, max_len: int, truncate: bool, framing: PairFraming = PairFraming()
) -> tuple[list, list]:
    """Pairs framed (see PairFraming). Over-long pairs are truncated (validation) or skipped
    (training)."""
    srcs, tgts = [], []
    src_room, tgt_room = framing.source_room(max_len), framing.target_room(max_len)
    for s, t in pairs:
        s = np.asarray(s, dtype=np.int64)
        t = np.asarray(t, dtype=np.int64)
        if len(s) > src_room or len(t) > tgt_room:
            if not truncate:
                continue
            s, t = s[:src_room], t[:tgt_room]
        srcs.append(np.concatenate([framing.src_prefix, s, framing.src_suffix]).astype(np.int64))
        tgts.append(np.concatenate([framing.tgt_prefix, t, framing.tgt_suffix]).astype(np.int64))
    return srcs, tgts


def token_batches(src_lens, tgt_lens, batch_tokens: int, rng) -> list[np.ndarray]:
    """Length-bucketed batches of at most batch_tokens = n_sentences * longest side.
    Random tie-breaking within equal lengths and shuffled batch order when rng is given."""
    order = rng.permutation(len(src_lens)) if rng is not None else np.arange(len(src_lens))
    size = np.maximum(src_lens, tgt_lens)[order]
    idx = np.argsort(size, kind="stable")
    order, size = order[idx], size[idx]
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        # Sorted ascending, so the batch's longest item is the one being added.
        if i == len(order) or (i + 1 - start) * size[i] > batch_tokens:
            batches.append(order[start:i])
            start = i
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(srcs, tgts, idx: np.ndarray, pad_id: int = PAD_ID) -> Batch:
    """(src, src_mask, tgt_in, tgt_out): inputs padded with pad_id, targets past the end with
    IGNORE_TARGET. The mask comes from the lengths, not from pad_id, which a checkpoint may
    also use as a real token (T5 starts the decoder with <pad>)."""
    S = max(len(srcs[i]) for i in idx)
    T = max(len(tgts[i]) for i in idx) - 1
    src = np.full((len(idx), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), S), dtype=bool)
    tgt_in = np.full((len(idx), T), pad_id, dtype=np.int64)
    tgt_out = np.full((len(idx), T), IGNORE_TARGET, dtype=np.int64)
    for r, i in enumerate(idx):
        src[r, : len(srcs[i])] = srcs[i]
        mask[r, : len(srcs[i])] = True
        tgt_in[r, : len(tgts[i]) - 1] = tgts[i][:-1]
        tgt_out[r, : len(tgts[i]) - 1] = tgts[i][1:]
    return tuple(torch.from_numpy(a) for a in (src, mask, tgt_in, tgt_out))


class PairBatches:
    """Endless epochs of shuffled length-bucketed batches (see token_batches).

    The position is (RNG state at the start of the epoch, batches consumed): loading it
    rebuilds that epoch's batch list and skips what was already consumed.
    """

    def __init__(
        self,
        srcs,
        tgts,
        batch_tokens: int,
        seed: int,
        *,
        rank: int = 0,
        world: int = 1,
        pad_id: int = PAD_ID,
    ) -> None:
        self.srcs, self.tgts, self.batch_tokens, self.pad_id = srcs, tgts, batch_tokens, pad_id
        self.rank, self.world = rank, world
        self.src_lens = np.array([len(s) for s in srcs])
        self.tgt_lens = np.array([len(t) - 1 for t in tgts])
        self.rng = np.random.default_rng(seed)
        self.epoch_rng: dict | None = None
        self.batches: list[np.ndarray] = []
        self.pos = 0
        self.pad_slots = 0  # padding statistics of this rank's batch tensors
        self.pad_real = 0

    def __iter__(self) -> PairBatches:
        return self

    def _new_epoch(self) -> None:
        self.epoch_rng = numpy_rng_state(self.rng)
        self.batches = token_batches(self.src_lens, self.tgt_lens, self.batch_tokens, self.rng)
        self.pos = 0

    def __next__(self) -> tuple[Batch, int]:
        if self.pos >= len(self.batches):
            self._new_epoch()
        idx = self.batches[self.pos]
        self.pos += 1
        local = idx[self.rank :: self.world]
        if len(local) == 0:  # fewer sentences than ranks: a zero-weight placeholder
            return collate(self.srcs, self.tgts, idx[:1], self.pad_id), 0
        batch = collate(self.srcs, self.tgts, local, self.pad_id)
        self.pad_slots += batch[0].numel() + batch[3].numel()
        self.pad_real += int(self.src_lens[local].sum() + self.tgt_lens[local].sum())
        return batch, int(self.tgt_lens[local].sum())

    def padding_fraction(self) -> float:
        return 1.0 - self.pad_real / max(self.pad_slots, 1)

    def state_dict(self) -> dict:
        return {
            "epoch_rng": self.epoch_rng,
            "pos": self.pos,
            "pad_slots": self.pad_slots,
            "pad_real": self.pad_real,
        }

    def load_state_dict(self, state: dict) -> None:
        self.pad_slots, self.pad_real = state["pad_slots"], state["pad_real"]
        if state["epoch_rng"] is None:
            return
        set_numpy_rng_state(self.rng, state["epoch_rng"])
        self._new_epoch()  # same RNG state -> same batches, and the RNG ends where it did
        self.pos = state["pos"]


def pair_valid_batches(v_srcs, v_tgts, batch_tokens: int, pad_id: int = PAD_ID) -> list[Batch]:
    lens = (np.array([len(s) for s in v_srcs]), np.array([len(t) - 1 for t in v_tgts]))
    batches = token_batches(*lens, batch_tokens, None)
    return [collate(v_srcs, v_tgts, idx, pad_id) for idx in batches]
