"""Search and sampling: greedy and beam search for seq2seq models, sampling for LMs.

Seq2seq decoding drives a model through encode / init_state / decode_step /
reorder_state (see seqmodels/models/family.py) and is batched over sentences (x beams), so
one decoder call per output position serves the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqmodels import BOS_ID, EOS_ID, PAD_ID


def select_batch(tree, index: torch.Tensor):
    """index_select(0, index) on every tensor in a nested dict/list/tuple."""
    if isinstance(tree, torch.Tensor):
        return tree.index_select(0, index)
    if isinstance(tree, dict):
        return {k: select_batch(v, index) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(select_batch(v, index) for v in tree)
    return tree


def _max_lengths(model, src_mask: torch.Tensor, max_len_a: float, max_len_b: float) -> torch.Tensor:
    """Per-sentence limit on generated tokens (EOS not counted): a * src_len + b, where
    src_len counts the non-pad source tokens (including the EOS the caller appends)."""
    src_len = src_mask.sum(1).float()
    max_len = (max_len_a * src_len + max_len_b).long().clamp(min=1)
    limit = model.max_positions  # every seq2seq model declares it (None: no limit)
    if limit is not None:  # decoding position t needs t < max_positions
        max_len = max_len.clamp(max=limit - 1)
    return max_len


def _next_log_probs(logits: torch.Tensor, force_eos: torch.Tensor | None) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    logp[:, PAD_ID] = float("-inf")  # never emitted by a well-formed target
    logp[:, BOS_ID] = float("-inf")
    if force_eos is not None and bool(force_eos.any()):
        eos = logp[:, EOS_ID].clone()
        logp[force_eos] = float("-inf")
        logp[:, EOS_ID] = torch.where(force_eos, eos, logp[:, EOS_ID])
    return logp


def _strip(ids: list[int]) -> list[int]:
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            out.append(i)
    return out


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
    return_scores: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[float]]:
    """Argmax decoding. Returns token ids per sentence (no bos/eos/pad) and, with
    return_scores, the summed log-probability of each output including its EOS."""
    B = src.size(0)
    max_len = _max_lengths(model, src_mask, max_len_a, max_len_b)
    memory = model.encode(src, src_mask)
    state = model.init_state(memory)
    tokens = torch.full((B,), BOS_ID, dtype=torch.long, device=src.device)
    scores = torch.zeros(B, device=src.device)
    ended = torch.zeros(B, dtype=torch.bool, device=src.device)
    out = []
    for t in range(int(max_len.max()) + 1):
        logits, state = model.decode_step(tokens, state, memory)
        logp = _next_log_probs(logits, t >= max_len)
        nxt = logp.argmax(-1)
        scores += torch.where(ended, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        nxt = torch.where(ended, PAD_ID, nxt)
        out.append(nxt)
        ended |= nxt == EOS_ID
        if bool(ended.all()):
            break
        tokens = nxt
    ids = [_strip(row) for row in torch.stack(out, 1).tolist()]
    return (ids, scores.tolist()) if return_scores else ids


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """Wu et al. (2016): lp(Y) = ((5 + |Y|) / 6) ** alpha; alpha=0 ranks by raw log-prob."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(  # long: one batched search loop; its state is easiest to follow in one place
    model: nn.Module,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    beam_size: int = 5,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
    length_penalty: float = 1.0,
    return_scores: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[float]]:
    """Batched beam search over B sentences x K beams.

    Hypotheses are ranked by log P(Y|X) / lp(Y) with the GNMT length penalty
    lp(Y) = ((5 + |Y|) / 6) ** length_penalty, |Y| counting the EOS token.
    As in fairseq, each step takes the top 2K candidates: those ending in EOS within
    the top K are finished, the best K others stay active. A sentence is done when
    it has K finished hypotheses; at a * src_len + b generated tokens EOS is forced.
    Returns the best hypothesis' ids per sentence (no bos/eos/pad) and, with
    return_scores, its length-penalised score.
    """
    B, K = src.size(0), beam_size
    device = src.device
    max_len = _max_lengths(model, src_mask, max_len_a, max_len_b)
    memory = model.encode(src, src_mask)
    memory = select_batch(memory, torch.arange(B, device=device).repeat_interleave(K))
    state = model.init_state(memory)
    max_len_bk = max_len.repeat_interleave(K)

    # Rows are (active sentence, beam) pairs; sentences leave the batch once done.
    sent_ids = list(range(B))  # original index of each active sentence
    tokens = torch.full((B * K,), BOS_ID, dtype=torch.long, device=device)
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]

    for t in range(int(max_len.max()) + 1):
        n = len(sent_ids)
        logits, state = model.decode_step(tokens, state, memory)
        logp = _next_log_probs(logits, t >= max_len_bk)
        V = logp.size(1)
        cand = (scores.view(n * K, 1) + logp).view(n, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)
        beam, tok = top_idx // V, top_idx % V
        is_eos = tok == EOS_ID

        done = []
        fin = is_eos[:, :K] & torch.isfinite(top_scores[:, :K])
        if bool(fin.any()):
            for b, j in fin.nonzero().tolist():
                hyp = seqs[b * K + int(beam[b, j])].tolist()
                score = float(top_scores[b, j]) / gnmt_length_penalty(len(hyp) + 1, length_penalty)
                finished[sent_ids[b]].append((score, hyp))
                if len(finished[sent_ids[b]]) == K:
                    done.append(b)
        if len(done) == n:
            break

        # Keep the K best candidates that did not end (there are always >= K of them).
        rank = torch.arange(2 * K, device=device).expand(n, 2 * K)
        keep = (rank + is_eos.long() * 2 * K).topk(K, dim=1, largest=False).indices
        scores = top_scores.gather(1, keep)
        row_base = (torch.arange(n, device=device) * K)[:, None]
        rows = row_base + beam.gather(1, keep)
        tokens = tok.gather(1, keep)
        if done:  # drop finished sentences: their rows need no more decoder work
            alive = torch.tensor(sorted(set(range(n)) - set(done)), device=device)
            scores, rows, tokens = scores[alive], rows[alive], tokens[alive]
            sent_ids = [sent_ids[i] for i in alive.tolist()]
            alive_rows = (alive[:, None] * K + torch.arange(K, device=device)).view(-1)
            memory = select_batch(memory, alive_rows)
            max_len_bk = max_len_bk[alive_rows]
        rows, tokens = rows.view(-1), tokens.view(-1)
        seqs = torch.cat([seqs[rows], tokens[:, None]], dim=1)
        state = model.reorder_state(state, rows)

    best_ids, best_scores = [], []
    for b in range(B):
        if finished[b]:
            score, hyp = max(finished[b], key=lambda h: h[0])
        else:  # cannot normally happen (EOS is forced), but never return nothing
            row = sent_ids.index(b) * K
            hyp, score = seqs[row].tolist(), float(scores.view(-1)[row])
        best_ids.append(_strip(hyp))
        best_scores.append(score)
    return (best_ids, best_scores) if return_scores else best_ids


@torch.no_grad()
def sequence_log_probs(
    model: nn.Module, src: torch.Tensor, src_mask: torch.Tensor, hyps: list[list[int]]
) -> list[float]:
    """Teacher-forced log P(hyp + EOS | src) for each sentence (for tests/rescoring)."""
    B = len(hyps)
    T = max(len(h) for h in hyps) + 1
    tgt_in = torch.full((B, T), PAD_ID, dtype=torch.long, device=src.device)
    tgt_out = torch.full((B, T), PAD_ID, dtype=torch.long, device=src.device)
    for i, h in enumerate(hyps):
        tgt_in[i, : len(h) + 1] = torch.tensor([BOS_ID] + h)
        tgt_out[i, : len(h) + 1] = torch.tensor(h + [EOS_ID])
    logp = F.log_softmax(model(src, src_mask, tgt_in).float(), dim=-1)
    tok_logp = logp.gather(2, tgt_out[..., None])[..., 0] * (tgt_out != PAD_ID)
    return tok_logp.sum(1).tolist()


def _sample(
    logits: torch.Tensor, temperature: float, top_k, top_p, generator, banned=(PAD_ID, BOS_ID)
) -> int:
    logits = logits.float().clone()
    for token in banned:  # ids that are not text (padding, start of sequence)
        logits[token] = float("-inf")
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (keeps >= 1 token).
        drop = (cum - F.softmax(sorted_logits, dim=-1)) >= top_p
        logits[order[drop]] = float("-inf")
    probs = F.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def sample_continuation(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = EOS_ID,
    banned: tuple[int, ...] = (PAD_ID, BOS_ID),
) -> list[int]:
    """Sample up to max_new_tokens after `prompt` (non-empty ids) from a language model.

    temperature <= 0 means greedy. Stops before emitting `stop_token` (end of line); the
    `banned` ids are never sampled (SentencePiece's pad and bos by default). The
    model's state (a key/value cache or a recurrent state) is carried from step to step; a
    model with a `max_context` is re-run on the last max_context // 2 tokens when its state
    is full (learned absolute positions cannot slide).
    """
    device = next(model.parameters()).device
    limit = model.max_context
    tokens = list(prompt)
    new: list[int] = []
    logits, state = model(torch.tensor([tokens[-limit:] if limit else tokens], device=device))
    for _ in range(max_new_tokens):
        nxt = _sample(logits[0, -1], temperature, top_k, top_p, generator, banned)
        if nxt == stop_token:
            break
        new.append(nxt)
        tokens.append(nxt)
        if limit is not None and model.state_length(state) + 1 > limit:
            context = tokens[-max(1, limit // 2) :]
            logits, state = model(torch.tensor([context], device=device))
        else:
            logits, state = model(torch.tensor([[nxt]], device=device), state)
    return new
