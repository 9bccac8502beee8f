"""ConvS2S (seqmodels.models.conv_seq2seq): the decoding interface, padding, learning, config."""

import pydantic
import pytest
import torch
import torch.nn.functional as F

from seqmodels import BOS_ID, EOS_ID, PAD_ID
from seqmodels.models.conv_seq2seq import ConvSeq2Seq, ConvSeq2SeqArchitecture

V = 50
TINY = ConvSeq2SeqArchitecture(
    emb_dim=16, hidden=24, n_enc_layers=3, n_dec_layers=3, kernel_size=3, max_positions=32
)


@pytest.fixture(autouse=True)
def one_thread(single_thread_torch):
    """Every test here runs torch single-threaded (see conftest.single_thread_torch)."""


def padded(seqs: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one (B, S) batch; returns (tokens, mask with True on real tokens)."""
    width = max(len(s) for s in seqs)
    rows = [
        [PAD_ID] * (width - len(s)) + s if left else s + [PAD_ID] * (width - len(s)) for s in seqs
    ]
    src = torch.tensor(rows)
    return src, src != PAD_ID


def random_sources(lengths: list[int], vocab: int = V) -> list[list[int]]:
    """Random sentences of real tokens (ids above the special ones) ending in EOS."""
    return [torch.randint(EOS_ID + 1, vocab, (n - 1,)).tolist() + [EOS_ID] for n in lengths]


def select_rows(memory: dict, index: torch.Tensor) -> dict:
    return {k: v.index_select(0, index) for k, v in memory.items()}


def tiny_model(seed: int = 0) -> ConvSeq2Seq:
    torch.manual_seed(seed)
    return ConvSeq2Seq(TINY, vocab_size=V).eval()  # eval: dropout off


@pytest.mark.parametrize(
    "index",
    [torch.tensor([2, 0, 3, 1]), torch.tensor([3, 3, 0, 1, 1, 2])],  # a permutation; beam-style
    ids=["permutation", "repeat"],
)
def test_incremental_decoding_equals_full_forward(index):
    model = tiny_model()
    torch.manual_seed(1)
    src, mask = padded(random_sources([7, 3, 5, 1]))
    tgt_in = torch.cat([torch.full((4, 1), BOS_ID), torch.randint(EOS_ID + 1, V, (4, 6))], 1)
    full = model(src, mask, tgt_in)
    assert full.shape == (4, 7, V)

    memory = model.encode(src, mask)
    state = model.init_state(memory)
    for t in range(3):
        logits, state = model.decode_step(tgt_in[:, t], state, memory)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)

    # Beam search reorders (and repeats) rows mid-sentence; decoding then continues exactly
    # like a full forward pass of the reordered batch.
    state = model.reorder_state(state, index)
    memory = select_rows(memory, index)
    src, mask, tgt_in = src[index], mask[index], tgt_in[index]
    full = model(src, mask, tgt_in)
    for t in range(3, tgt_in.size(1)):
        logits, state = model.decode_step(tgt_in[:, t], state, memory)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)


def test_state_layout_is_batch_first():
    model = tiny_model()
    src, mask = padded(random_sources([4, 2]))
    state = model.init_state(model.encode(src, mask))
    assert [c.shape for c in state["conv"]] == [(2, TINY.kernel_size - 1, TINY.hidden)] * 3
    assert state["pos"].tolist() == [0, 0]


def test_source_padding_does_not_leak():
    model = tiny_model()
    torch.manual_seed(2)
    (sentence,) = random_sources([6])
    tgt_in = torch.tensor([[BOS_ID, 9, 10, 11]])
    alone = model(*padded([sentence]), tgt_in)

    # Extra PAD columns on the right, on the left, and a longer neighbour in the batch.
    right = torch.tensor([sentence + [PAD_ID] * 5])
    left = torch.tensor([[PAD_ID] * 5 + sentence])
    for src in (right, left):
        torch.testing.assert_close(model(src, src != PAD_ID, tgt_in), alone, atol=1e-5, rtol=0)
    batch_src, batch_mask = padded([sentence, *random_sources([11])])
    in_batch = model(batch_src, batch_mask, tgt_in.expand(2, -1))[:1]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=0)


def greedy(model: ConvSeq2Seq, src: torch.Tensor, mask: torch.Tensor, max_len: int) -> list:
    """Argmax decoding through the incremental interface; stops each row at EOS."""
    memory = model.encode(src, mask)
    state = model.init_state(memory)
    tokens = torch.full((src.size(0),), BOS_ID)
    out = []
    for _ in range(max_len):
        logits, state = model.decode_step(tokens, state, memory)
        tokens = logits.argmax(-1)
        out.append(tokens)
    rows = torch.stack(out, 1).tolist()
    return [row[: row.index(EOS_ID)] if EOS_ID in row else row for row in rows]


def test_tiny_model_learns_copy_task():
    torch.manual_seed(0)
    vocab = 20
    arch = ConvSeq2SeqArchitecture(
        emb_dim=32, hidden=32, n_enc_layers=2, n_dec_layers=2, dropout=0.1, max_positions=16
    )
    model = ConvSeq2Seq(arch, vocab_size=vocab)
    sentences = [s[:-1] for s in random_sources(torch.randint(6, 10, (20,)).tolist(), vocab)]
    src, mask = padded([s + [EOS_ID] for s in sentences])
    tgt_in, _ = padded([[BOS_ID] + s for s in sentences])
    tgt_out, _ = padded([s + [EOS_ID] for s in sentences])

    def loss_fn() -> torch.Tensor:
        logits = model(src, mask, tgt_in)
        return F.cross_entropy(logits.transpose(1, 2), tgt_out, ignore_index=PAD_ID)

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = loss_fn()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = loss_fn().item()
        decoded = greedy(model, src, mask, max_len=12)
    assert final < 0.2 * first, (first, final)
    correct = sum(d == s for d, s in zip(decoded, sentences, strict=True))
    assert correct >= 16, f"{correct}/20 copied"


@pytest.mark.parametrize(
    "field, value", [("kernel_size", 4), ("dropout", 1.0), ("n_dec_layers", 0), ("hidden", -1)]
)
def test_invalid_architecture_is_rejected(field, value):
    torch.manual_seed(0)
    with pytest.raises(pydantic.ValidationError, match=field):
        ConvSeq2SeqArchitecture(**{field: value})
    with pytest.raises(pydantic.ValidationError, match="n_heads"):  # unknown fields too
        ConvSeq2SeqArchitecture(n_heads=4)


def test_too_long_inputs_raise():
    torch.manual_seed(0)
    arch = TINY.model_copy(update={"max_positions": 8})
    model = ConvSeq2Seq(arch, vocab_size=V).eval()
    assert model.max_positions == 8
    long_src = torch.randint(EOS_ID + 1, V, (1, 9))
    with pytest.raises(ValueError, match="length 9 > max_positions 8"):
        model.encode(long_src, long_src != PAD_ID)
    src = long_src[:, :8]
    with pytest.raises(ValueError, match="length 9 > max_positions 8"):
        model(src, src != PAD_ID, torch.full((1, 9), BOS_ID))
    # Decoding positions 0..7 are fine; the ninth step would need position 8.
    memory = model.encode(src, src != PAD_ID)
    state = model.init_state(memory)
    tokens = torch.tensor([BOS_ID])
    for _ in range(8):
        _, state = model.decode_step(tokens, state, memory)
    with pytest.raises(ValueError, match="length 9 > max_positions 8"):
        model.decode_step(tokens, state, memory)


def test_flops_per_token_formula():
    torch.manual_seed(0)
    arch = ConvSeq2SeqArchitecture(emb_dim=4, hidden=6, n_enc_layers=1, n_dec_layers=1)
    model = ConvSeq2Seq(arch, vocab_size=10)
    E, H, k = 4, 6, 3
    conv = 2 * H * H * k + 2 * H
    enc = (E * H + H) + conv + (H * E + E)  # fc1, conv, fc2; embeddings are lookups
    dec = (E * H + H) + conv + (H * E + E) + (E * H + H) + (H * E + E) + (E * 10 + 10)
    expected = 6 * (dec + enc * 12 / 10) + 1 * 12 * E * 12
    assert model.flops_per_token(src_len=12, tgt_len=10) == pytest.approx(expected)
