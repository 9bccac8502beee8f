"""Training FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per predicted token follow Kaplan et al. (2020) / PaLM (Chowdhery et al., 2022):
6 * N for the forward and backward matmuls of N parameters (2 per multiply-add forward, 4
backward), plus the attention score and value products that N does not cover:
12 * n_layer * d_model * context per token (QK^T and AV, forward + backward; causal masking
is ignored, as in PaLM). N counts the parameters used in matmuls: embedding tables that are
only looked up (positions, untied inputs) are left out; a table reused as the output
projection counts once. Seq2seq FLOPs are per target token: encoder parameters and
encoder self-attention are scaled by the mean source/target length ratio, and the decoder
attends over the target (self) and the source (cross). Padding is not counted, so MFU is
the useful share of the hardware. LSTM attention and softmax FLOPs are ignored (small).
Each model computes its own FLOPs per token (`model.flops_per_token(...)`) from these pieces.

MFU = achieved FLOP/s / peak FLOP/s, where the peak is measured once per process with a
bf16 (CUDA) or fp32 (CPU) matmul benchmark, or taken from SEQMODELS_PEAK_FLOPS.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn

PEAK_ENV = "SEQMODELS_PEAK_FLOPS"
_peak_cache: dict[str, float] = {}


def matmul_params(model: nn.Module, encoder_prefixes: tuple[str, ...] = ()) -> tuple[int, int]:
    """(encoder, other) counts of the parameters that take part in matmuls (see the module
    doc); parameters whose names start with one of `encoder_prefixes` count as encoder."""
    lookups = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            lookups.pop(id(m.weight), None)  # tied to an output projection: a real matmul
    enc = other = 0
    for name, p in model.named_parameters():  # shared parameters are listed once
        if id(p) in lookups:
            continue
        if encoder_prefixes and name.startswith(encoder_prefixes):
            enc += p.numel()
        else:
            other += p.numel()
    return enc, other


def seq2seq_flops_per_token(
    encoder_params: int, other_params: int, src_len: float, tgt_len: float
) -> float:
    """Matmul FLOPs per target token of an encoder-decoder: encoder work is scaled by the
    mean source/target length ratio (attention terms are added by each model)."""
    ratio = src_len / max(tgt_len, 1e-9)  # source tokens per target token
    return 6.0 * (other_params + encoder_params * ratio)


def _measure_peak(device: torch.device) -> float:
    if device.type == "cuda":
        n, dtype = 4096, torch.bfloat16
    else:
        n, dtype = 512, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm up kernels / thread pools
        a @ b
    sync()
    best = 0.0
    for _ in range(5):  # best of a few short rounds: robust to a busy machine
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if reps % 4 == 0:
                sync()
                dt = time.perf_counter() - t0
                if dt > 0.05:
                    break
        best = max(best, 2.0 * n**3 * reps / dt)
    return best


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of `device`: SEQMODELS_PEAK_FLOPS if set, else measured once per process."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    key = str(device)
    if key not in _peak_cache:
        _peak_cache[key] = _measure_peak(device)
    return _peak_cache[key]
