"""Data stages: download, archives, text preparation, Polars cleaning and its report,
splits and the SentencePiece vocabulary."""
