"""Search and sampling: greedy and beam search for seq2seq models, sampling for LMs.

Seq2seq decoding drives a model through encode / init_state / decode_step /
reorder_state (see seqmodels/models/family.py) and is batched over sentences (x beams), so
one decoder call per output position serves the whole batch.

Both searches take the constraints a summariser needs, each off (free) at its default:
- max_len_a, max_len_b: at most a * source length + b generated tokens (EOS not counted);
  EOS is forced once a row has that many;
- min_len: EOS is forbidden until a row has min_len tokens; where min_len exceeds a row's
  max length the max wins (EOS is forced there all the same), so decoding always ends;
- no_repeat_ngram_size n: a token that would complete an n-gram already in the row's own
  output is banned (fairseq's and Hugging Face's rule; per beam hypothesis).
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


def ban_repeated_ngrams(log_probs: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf, in place, the log-probability of every token that would complete an
    n-gram already present in its row: log_probs (R, V) of the next token, tokens (R, T) the
    tokens each row has generated so far, in order. Returns log_probs; n <= 0 bans nothing.

    The rule of fairseq's and Hugging Face's no_repeat_ngram_size. Their histories also hold
    the start token; it makes no difference, since it never recurs (so no n-gram with it can
    repeat). One batched comparison of every (n-1)-gram with each row's last n-1 tokens:
    O(R * T * n) work on the device, no Python loop over rows.
    """
    R, T = tokens.shape
    if n <= 0 or T < n:  # no complete n-gram yet
        return log_probs
    if n == 1:  # every token seen is a repeated 1-gram
        return log_probs.scatter_(1, tokens, float("-inf"))
    # Row r bans tokens[r, i + n - 1] wherever tokens[r, i : i + n - 1] equals its last n - 1.
    prefixes = tokens.unfold(1, n - 1, 1)[:, : T - n + 1]  # (R, T - n + 1, n - 1)
    match = (prefixes == tokens[:, None, T - n + 1 :]).all(-1)
    V = log_probs.size(1)
    # Non-matches scatter into a spare column V, so no write of False races one of True.
    banned = torch.where(match, tokens[:, n - 1 :], V)
    mask = torch.zeros(R, V + 1, dtype=torch.bool, device=log_probs.device)
    mask.scatter_(1, banned, True)
    return log_probs.masked_fill_(mask[:, :V], float("-inf"))


def forbid_eos(
    log_probs: torch.Tensor, step: int, min_len: int, at_max: torch.Tensor | None = None
) -> torch.Tensor:
    """EOS gets -inf, in place, while fewer than min_len tokens are out (`step` tokens so far,
    EOS not counted), except in the rows at their max length (`at_max`, bool (R,)): EOS is
    forced there, the max length wins over min_len. Returns log_probs."""
    if step >= min_len:
        return log_probs
    if at_max is None:
        log_probs[:, EOS_ID] = float("-inf")
    else:
        log_probs[:, EOS_ID] = torch.where(at_max, log_probs[:, EOS_ID], float("-inf"))
    return log_probs


def _next_log_probs(
    logits: torch.Tensor,
    force_eos: torch.Tensor | None,
    *,
    step: int = 0,
    history: torch.Tensor | None = None,
    min_len: int = 0,
    no_repeat_ngram_size: int = 0,
) -> torch.Tensor:
    """Log-probabilities of the next token with the constraints applied: PAD and BOS never,
    no repeated n-gram (of `history`, the rows' tokens so far), no EOS before min_len, EOS
    forced where force_eos (the max length: applied last, so it wins)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logp[:, PAD_ID] = float("-inf")  # never emitted by a well-formed target
    logp[:, BOS_ID] = float("-inf")
    if no_repeat_ngram_size > 0 and history is not None:
        ban_repeated_ngrams(logp, history, no_repeat_ngram_size)
    if min_len > 0:
        forbid_eos(logp, step, min_len, force_eos)
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
    *,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
    return_scores: bool = False,
    min_len: int = 0,
    no_repeat_ngram_size: int = 0,
) -> list[list[int]] | tuple[list[list[int]], list[float]]:
    """Argmax decoding. Returns token ids per sentence (no bos/eos/pad) and, with
    return_scores, the summed log-probability of each output including its EOS.
    min_len and no_repeat_ngram_size: see the module docstring (0: off)."""
    B = src.size(0)
    max_len = _max_lengths(model, src_mask, max_len_a, max_len_b)
    memory = model.encode(src, src_mask)
    state = model.init_state(memory)
    tokens = torch.full((B,), BOS_ID, dtype=torch.long, device=src.device)
    scores = torch.zeros(B, device=src.device)
    ended = torch.zeros(B, dtype=torch.bool, device=src.device)
    steps = int(max_len.max()) + 1
    # Written column by column: out[:, :t] is also the history no_repeat_ngram_size reads.
    out = torch.full((B, steps), PAD_ID, dtype=torch.long, device=src.device)
    for t in range(steps):
        logits, state = model.decode_step(tokens, state, memory)
        logp = _next_log_probs(
            logits,
            t >= max_len,
            step=t,
            history=out[:, :t],
            min_len=min_len,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        nxt = logp.argmax(-1)
        scores += torch.where(ended, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        nxt = torch.where(ended, PAD_ID, nxt)
        out[:, t] = nxt
        ended |= nxt == EOS_ID
        if bool(ended.all()):
            break
        tokens = nxt
    ids = [_strip(row) for row in out[:, : t + 1].tolist()]
    return (ids, scores.tolist()) if return_scores else ids


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """Wu et al. (2016): lp(Y) = ((5 + |Y|) / 6) ** alpha; alpha=0 ranks by raw log-prob."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    model: nn.Module,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    *,
    beam_size: int = 5,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
    length_penalty: float = 1.0,
    return_scores: bool = False,
    min_len: int = 0,
    no_repeat_ngram_size: int = 0,
) -> list[list[int]] | tuple[list[list[int]], list[float]]:
    """Batched beam search over B sentences x K beams.

    Hypotheses are ranked by log P(Y|X) / lp(Y) with the GNMT length penalty
    lp(Y) = ((5 + |Y|) / 6) ** length_penalty, |Y| counting the EOS token.
    As in fairseq, each step takes the top 2K candidates: those ending in EOS within
    the top K are finished, the best K others stay active. A sentence is done when
    it has K finished hypotheses; at a * src_len + b generated tokens EOS is forced.
    Returns the best hypothesis' ids per sentence (no bos/eos/pad) and, with
    return_scores, its length-penalised score. min_len and no_repeat_ngram_size (each
    hypothesis' own n-grams): see the module docstring (0: off).
    """
    B, K, device = src.size(0), beam_size, src.device
    max_len = _max_lengths(model, src_mask, max_len_a, max_len_b)
    memory, state, logits = _start_beams(model, src, src_mask, K)
    max_len_bk = max_len.repeat_interleave(K)

    # Rows are (active sentence, beam) pairs; sentences leave the batch once done.
    sent_ids = list(range(B))  # original index of each active sentence
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]

    n_steps = int(max_len.max()) + 1  # the last forces EOS in every row
    for t in range(n_steps):
        n = len(sent_ids)
        logp = _next_log_probs(
            logits,
            t >= max_len_bk,
            step=t,
            history=seqs,
            min_len=min_len,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        V = logp.size(1)
        cand = (scores.view(n * K, 1) + logp).view(n, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)
        beam, tok = top_idx // V, top_idx % V
        is_eos = tok == EOS_ID
        done = _take_finished(
            finished,
            sent_ids=sent_ids,
            seqs=seqs.view(n, K, seqs.size(1)),
            beam=beam,
            top_scores=top_scores,
            is_eos=is_eos,
            length_penalty=length_penalty,
        )
        if len(done) == n:
            break

        scores, rows, tokens = _surviving_beams(top_scores, beam, tok, is_eos)
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
        if t + 1 < n_steps:
            logits, state = model.decode_step(tokens, state, memory)

    best_ids, best_scores = _best_hypotheses(finished, sent_ids, seqs, scores, K)
    return (best_ids, best_scores) if return_scores else best_ids


def _start_beams(
    model: nn.Module, src: torch.Tensor, src_mask: torch.Tensor, beam_size: int
) -> tuple[object, object, torch.Tensor]:
    """Memory, decoder state and first-step logits for B x K rows (sentence-major). The K
    beams of a sentence start identical, so the encoder and the first decoder step run once
    per sentence (B rows) and are then copied to each beam (CTranslate2 does the same)."""
    B = src.size(0)
    memory = model.encode(src, src_mask)
    state = model.init_state(memory)
    bos = torch.full((B,), BOS_ID, dtype=torch.long, device=src.device)
    logits, state = model.decode_step(bos, state, memory)
    per_beam = torch.arange(B, device=src.device).repeat_interleave(beam_size)
    memory, state = select_batch(memory, per_beam), model.reorder_state(state, per_beam)
    return memory, state, logits.index_select(0, per_beam)


def _take_finished(
    finished: list[list[tuple[float, list[int]]]],
    *,
    sent_ids: list[int],
    seqs: torch.Tensor,
    beam: torch.Tensor,
    top_scores: torch.Tensor,
    is_eos: torch.Tensor,
    length_penalty: float,
) -> list[int]:
    """Add to `finished` (per original sentence) every candidate that ends in EOS within the
    top K of its active sentence, scored log P / lp(|Y|); return the active sentences that now
    hold K finished hypotheses. seqs: (active sentences, K, tokens so far); beam, top_scores,
    is_eos: (active sentences, 2K), the parent beam, score and EOS flag of each candidate."""
    K = seqs.size(1)
    done = []
    fin = is_eos[:, :K] & torch.isfinite(top_scores[:, :K])
    if bool(fin.any()):
        for b, j in fin.nonzero().tolist():
            hyp = seqs[b, int(beam[b, j])].tolist()
            score = float(top_scores[b, j]) / gnmt_length_penalty(len(hyp) + 1, length_penalty)
            finished[sent_ids[b]].append((score, hyp))
            if len(finished[sent_ids[b]]) == K:
                done.append(b)
    return done


def _surviving_beams(
    top_scores: torch.Tensor, beam: torch.Tensor, tok: torch.Tensor, is_eos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K best candidates of each active sentence that did not end (of 2K there are always
    >= K): their scores (n, K), parent rows in the flat (n x K) layout, and tokens."""
    n, K = beam.size(0), beam.size(1) // 2
    rank = torch.arange(2 * K, device=beam.device).expand(n, 2 * K)
    keep = (rank + is_eos.long() * 2 * K).topk(K, dim=1, largest=False).indices
    rows = (torch.arange(n, device=beam.device) * K)[:, None] + beam.gather(1, keep)
    return top_scores.gather(1, keep), rows, tok.gather(1, keep)


def _best_hypotheses(
    finished: list[list[tuple[float, list[int]]]],
    sent_ids: list[int],
    seqs: torch.Tensor,
    scores: torch.Tensor,
    K: int,
) -> tuple[list[list[int]], list[float]]:
    """Each sentence's best finished hypothesis (ids without bos/eos/pad) and its score."""
    best_ids, best_scores = [], []
    for b, done in enumerate(finished):
        if done:
            score, hyp = max(done, key=lambda h: h[0])
        else:  # cannot normally happen (EOS is forced), but never return nothing
            row = sent_ids.index(b) * K
            hyp, score = seqs[row].tolist(), float(scores.view(-1)[row])
        best_ids.append(_strip(hyp))
        best_scores.append(score)
    return best_ids, best_scores


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
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    banned: tuple[int, ...],
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
    *,
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
        nxt = _sample(
            logits[0, -1],
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            banned=banned,
        )
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
