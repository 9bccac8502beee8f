"""Training: the shared loop (trainer.py), the LM and seq2seq recipes, settings, batching,
checkpoints, data parallelism, FLOPs/MFU and progress display."""
