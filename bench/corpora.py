"""Corpora for the benchmarks, fetched through seqmodels' own download code from the mirror
(SEQMODELS_MIRROR, default ../shared/corpora). No torch here: the clean benchmark's workers
import nothing they do not measure."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def multi30k(cache: Path) -> dict[str, list[str]]:
    """Multi30k de-en lines by "split.lang" (train/valid/test)."""
    from seqmodels.config import load_config
    from seqmodels.data.download import download_file

    default_mirror = str(ROOT.parent / "shared" / "corpora")
    mirrors = (os.environ.get("SEQMODELS_MIRROR") or default_mirror).split(",")
    corpus = load_config(ROOT / "configs" / "default.yaml").experiments["mt-multi30k-de-en"].corpus
    out = {}
    for f in corpus.files:
        path = download_file(f.url, f.sha256, cache, mirrors)
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            out[f"{f.split}.{f.lang}"] = fh.read().split("\n")[:-1]
    return out


def multi30k_from_parquet(parquet: Path) -> dict[str, list[str]]:
    """Multi30k de-en lines by "split.lang" from seqmodels' cleaned Parquet (pyarrow only:
    what bench/gpu_suite.py reads on a machine without Polars)."""
    from seqmodels.data.splits import read_split

    out = {}
    for split in ("train", "valid", "test"):
        rows = read_split(parquet, split, ["src", "tgt"])
        out[f"{split}.de"], out[f"{split}.en"] = rows["src"], rows["tgt"]
    return out
