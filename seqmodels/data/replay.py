"""The rows a model continued from the champion trains on: every train row of the files that
are new since the champion's corpus version, plus a fixed fraction of the older train rows
(replay, against forgetting). Valid and test stay whole, so the continued model is scored on
the same test set as every other version.

Which older rows are replayed is decided per row, simply and deterministically: a row is kept
when the first 8 bytes of sha256("<source_file>\\t<line>"), as a number in [0, 1), are below
the fraction. The key is the row's origin (file URL and line), not its position in the
Parquet (the `id` column changes when a file is added), so the same old row is replayed or
left out by every run with the same fraction, and a larger fraction keeps a superset.

Library code: no Prefect or MLflow here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from seqmodels.files import atomic_path, json_digest


def replayed(source_file: str, line: int, fraction: float) -> bool:
    """Whether an older train row (its file URL and line) is replayed at this fraction."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"{source_file}\t{line}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def continuation_parquet(
    parquet: str | Path, new_files: list[str], fraction: float, out_dir: str | Path
) -> tuple[Path, dict[str, int]]:
    """`parquet` reduced to what a continued model trains on, written (once, content-keyed)
    under `out_dir`; returns its path and counts: new train rows, older rows replayed, older
    rows left out. Valid and test rows are all kept.

    When no train row comes from a new file (only pinned files changed, or the files new to
    the champion were all filtered out), every train row is kept: a continuation needs data."""
    frame = pl.read_parquet(parquet)
    new = set(new_files)
    keep, n_new, n_replayed, n_dropped = [], 0, 0, 0
    for split, source_file, line in zip(
        frame["split"], frame["source_file"], frame["line"], strict=True
    ):
        if split != "train":
            keep.append(True)
        elif source_file in new:
            keep.append(True)
            n_new += 1
        else:
            kept = replayed(source_file, line, fraction)
            keep.append(kept)
            n_replayed += kept
            n_dropped += not kept
    counts = {
        "continue_new_rows": n_new,
        "continue_replayed_rows": n_replayed,
        "continue_dropped_rows": n_dropped,
    }
    if n_new == 0:
        counts.update(continue_replayed_rows=n_replayed + n_dropped, continue_dropped_rows=0)
        return Path(parquet), counts
    key = json_digest(str(parquet), sorted(new), fraction)
    target = Path(out_dir) / key / "corpus.parquet"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            frame.filter(pl.Series(keep, dtype=pl.Boolean)).write_parquet(tmp, compression="zstd")
    return target, counts
