"""Inference: beam search, greedy decoding and sampling, and the predictors built around a
trained model."""
