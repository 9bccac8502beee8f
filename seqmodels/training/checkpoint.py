"""Training checkpoints: atomic writes, RNG capture, pruning and weight averaging.

A checkpoint is out_dir/checkpoints/step-XXXXXXX.pt holding everything needed to continue a
run exactly: model, optimizer, grad scaler, schedule position, RNG states, the batch
iterator's position and the trainer's bookkeeping. Only tensors, numbers, strings, lists and
dicts are stored, so every file loads with torch.load(path, weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqmodels.files import atomic_write, json_digest

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{7,})\.pt$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{step:07d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first (temp files are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def clear_checkpoints(ckpt_dir: Path) -> None:
    """Remove checkpoints and leftover temp files (a run killed mid-write leaves one)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        if _NAME.match(p.name) or (p.name.startswith(".step-") and p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)


def remove_temp_files(ckpt_dir: Path) -> None:
    for p in Path(ckpt_dir).glob(".step-*.tmp"):
        p.unlink(missing_ok=True)


def config_hash(*parts: Any) -> str:
    """A stable digest of JSON-able parts (model identity, train settings, data fingerprint)."""
    return json_digest(*parts)


def array_fingerprint(arrays) -> str:
    """Digest of the training data, so a checkpoint is never resumed on different data."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --- RNG states -------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch CPU (+ CUDA) and python `random` states as tensors and plain lists."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another GPU count: seed what we can rather than fail
            torch.cuda.set_rng_state(cuda[0])


def numpy_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    # The bit generator state is a dict of str/int (PCG64's are 128-bit ints, which
    # pickle stores exactly); copied so later draws do not mutate the saved value.
    return json.loads(json.dumps(rng.bit_generator.state))


def set_numpy_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


# --- save / load / prune ----------------------------------------------------------------


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any]) -> Path:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(ckpt_dir, step)
    atomic_write(path, lambda p: torch.save({"format": FORMAT_VERSION, **state}, p))
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def prune_checkpoints(
    ckpt_dir: Path, keep_last: int, keep_best: int, metrics: dict[int, float]
) -> list[Path]:
    """Delete all but the newest `keep_last` and the `keep_best` best (highest metric;
    `metrics` maps step -> higher-is-better validation metric). Returns the deleted paths."""
    found = list_checkpoints(ckpt_dir)
    keep = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    scored = sorted(
        (s for s, _ in found if s in metrics and np.isfinite(metrics[s])),
        key=lambda s: (-metrics[s], s),
    )
    keep |= set(scored[: max(keep_best, 0)])
    removed = []
    for step, path in found:
        if step not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (accumulated in float64, cast back);
    integer tensors (counters, indices) are taken from the last state."""
    if not states:
        raise ValueError("nothing to average")
    keys = list(states[-1])
    for s in states:
        if list(s) != keys:
            raise ValueError("state dicts have different keys")
    out = {}
    for k in keys:
        last = states[-1][k]
        if last.is_floating_point():
            total = torch.zeros_like(last, dtype=torch.float64)
            for s in states:
                total += s[k].to(torch.float64)
            out[k] = (total / len(states)).to(last.dtype)
        else:
            out[k] = last.clone()
    return out


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The mean model weights of the given training checkpoints (fairseq-style averaging)."""
    return average_state_dicts([load_checkpoint(p)["model"] for p in paths])
