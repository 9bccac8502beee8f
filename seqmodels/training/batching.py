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
        self, ids: np.ndarray, block: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
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


# --- translation models -----------------------------------------------------------------


def prepare_pairs(pairs, max_len: int, truncate: bool) -> tuple[list, list]:
    """src -> src + [EOS]; tgt -> [BOS] + tgt + [EOS]. Over-long pairs are truncated
    (validation) or skipped (training)."""
    srcs, tgts = [], []
    for s, t in pairs:
        s = np.asarray(s, dtype=np.int64)
        t = np.asarray(t, dtype=np.int64)
        if len(s) + 1 > max_len or len(t) + 1 > max_len:
            if not truncate:
                continue
            s, t = s[: max_len - 1], t[: max_len - 1]
        srcs.append(np.append(s, EOS_ID))
        tgts.append(np.concatenate([[BOS_ID], t, [EOS_ID]]))
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


def collate(srcs, tgts, idx: np.ndarray) -> Batch:
    S = max(len(srcs[i]) for i in idx)
    T = max(len(tgts[i]) for i in idx) - 1
    src = np.full((len(idx), S), PAD_ID, dtype=np.int64)
    tgt = np.full((len(idx), T + 1), PAD_ID, dtype=np.int64)
    for r, i in enumerate(idx):
        src[r, : len(srcs[i])] = srcs[i]
        tgt[r, : len(tgts[i])] = tgts[i]
    src_t, tgt_t = torch.from_numpy(src), torch.from_numpy(tgt)
    return src_t, src_t != PAD_ID, tgt_t[:, :-1], tgt_t[:, 1:]


class PairBatches:
    """Endless epochs of shuffled length-bucketed batches (see token_batches).

    The position is (RNG state at the start of the epoch, batches consumed): loading it
    rebuilds that epoch's batch list and skips what was already consumed.
    """

    def __init__(
        self, srcs, tgts, batch_tokens: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.srcs, self.tgts, self.batch_tokens = srcs, tgts, batch_tokens
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
            return collate(self.srcs, self.tgts, idx[:1]), 0
        batch = collate(self.srcs, self.tgts, local)
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


def pair_valid_batches(v_srcs, v_tgts, batch_tokens: int) -> list[Batch]:
    lens = (np.array([len(s) for s in v_srcs]), np.array([len(t) - 1 for t in v_tgts]))
    return [collate(v_srcs, v_tgts, idx) for idx in token_batches(*lens, batch_tokens, None)]
