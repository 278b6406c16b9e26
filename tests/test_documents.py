"""Packed documents (`SambaLM(..., document_ids=)`): in float64, each document of a packed row gives
exactly the logits and the parameter gradients of that document run alone: in one forward, streamed
in chunks (boundaries inside a chunk and at its edge), token by token, with left padding, for every
layer kind; and what the trainer's `--pack documents` feeds the model."""

import pytest
import torch

from samba_lm.documents import document_starts, documents_from_eos
from samba_lm.state import NO_DOCUMENT

from conftest import small_model

LENGTHS = (5, 1, 9, 4)  # a one-token document; a long one past the window (8) and the chunks


def packed_row(lengths=LENGTHS, first_id=3, generator=None):
    ids = torch.randint(1, 97, (sum(lengths),), generator=generator)
    docs = torch.cat([torch.full((n,), first_id + 2 * i) for i, n in enumerate(lengths)])  # ids need not be dense
    return ids, docs


def pieces(x, lengths):
    return list(torch.split(x, list(lengths)))


def test_documents_from_eos():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 0, 3], [0, 1, 2, 3, 4, 5, 6]])
    assert documents_from_eos(tokens, eos_id=0).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_document_starts_within_a_chunk_and_across_calls():
    positions = torch.arange(10, 16)[None]
    docs = torch.tensor([[4, 4, 5, 5, 5, 7]])
    alone = document_starts(docs, positions)
    assert alone.reset.tolist() == [[True, False, True, False, False, True]]
    assert alone.start.tolist() == [[10, 10, 12, 12, 12, 15]]
    model = small_model()
    state = model.init_state(1)
    state.doc.fill_(4)
    state.doc_start.fill_(7)  # document 4 began at position 7, before this chunk
    carried = document_starts(docs, positions, state)
    assert carried.reset.tolist() == [[False, False, True, False, False, True]]
    assert carried.start.tolist() == [[7, 7, 12, 12, 12, 15]]


@pytest.fixture(scope="module")
def model():
    return small_model(torch.float64)  # every layer kind: mamba, mlp, swa, attn


def test_each_document_of_a_packed_row_equals_it_alone(model):
    """Logits, and the gradients of every parameter for a loss over the logits."""
    ids, docs = packed_row()
    weights = torch.randn(len(ids), model.config.vocab_size, dtype=torch.float64)
    packed = model(ids[None], document_ids=docs[None]).logits[0]
    grads = torch.autograd.grad((packed * weights).sum(), list(model.parameters()))
    alone_logits, alone_loss = [], 0
    for piece, w in zip(pieces(ids, LENGTHS), pieces(weights, LENGTHS)):
        logits = model(piece[None]).logits[0]
        alone_logits.append(logits)
        alone_loss = alone_loss + (logits * w).sum()
    torch.testing.assert_close(packed, torch.cat(alone_logits), rtol=1e-10, atol=1e-10)
    for g, want in zip(grads, torch.autograd.grad(alone_loss, list(model.parameters()))):
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-10)


def test_without_document_ids_nothing_changes(model):
    ids, _ = packed_row()
    one = torch.zeros(1, len(ids), dtype=torch.long)  # a single document: as if none were given
    torch.testing.assert_close(model(ids[None], document_ids=one).logits, model(ids[None]).logits,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 5, 6])  # token by token; boundaries inside chunks and at their edges
def test_streamed_in_chunks_with_a_state_equals_the_full_forward(model, chunk):
    ids, docs = packed_row()
    full = model(ids[None], document_ids=docs[None]).logits[0]
    state = model.init_state(1, capacity=32)
    parts = []
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            parts.append(model(ids[None, s:s + chunk], state=state, document_ids=docs[None, s:s + chunk]).logits[0])
    torch.testing.assert_close(torch.cat(parts), full.detach(), rtol=1e-10, atol=1e-10)
    assert state.doc.item() == docs[-1].item() and state.doc_start.item() == sum(LENGTHS[:-1])


def test_a_new_id_after_a_state_starts_a_fresh_document(model):
    """The state's document ends when the next chunk starts with another id: that chunk runs as a
    new stream would, whatever the state holds."""
    first, second = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 4))
    state = model.init_state(1, capacity=32)
    with torch.no_grad():
        model(first, state=state, document_ids=torch.zeros_like(first))
        got = model(second, state=state, document_ids=torch.ones_like(second)).logits
        torch.testing.assert_close(got, model(second).logits, rtol=1e-10, atol=1e-10)
        assert state.doc.tolist() == [1] and state.doc_start.tolist() == [7]
        state.reset()
    assert state.doc.tolist() == [NO_DOCUMENT] and state.doc_start.tolist() == [0]


def test_rows_are_independent_and_left_padding_combines_with_documents(model):
    """Two rows of different lengths, left-padded in one batch with a state; each document of each row
    equals it alone."""
    g = torch.Generator().manual_seed(1)
    rows = [packed_row((3, 6), generator=g), packed_row((2, 1, 4, 5), generator=g)]
    width = max(len(ids) for ids, _ in rows)
    pad = [width - len(ids) for ids, _ in rows]
    ids = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r[0]]) for p, r in zip(pad, rows)])
    docs = torch.stack([torch.cat([torch.full((p,), int(r[1][0])), r[1]]) for p, r in zip(pad, rows)])
    state = model.init_state(2, start=[-p for p in pad], capacity=32)
    with torch.no_grad():
        logits = model(ids, state=state, document_ids=docs).logits
        for b, ((row_ids, row_docs), p) in enumerate(zip(rows, pad)):
            lengths = torch.unique_consecutive(row_docs, return_counts=True)[1].tolist()
            want = torch.cat([model(piece[None]).logits[0] for piece in pieces(row_ids, lengths)])
            torch.testing.assert_close(logits[b, p:], want, rtol=1e-10, atol=1e-10)


def test_labels_with_documents_give_the_mean_of_the_documents_alone(model):
    ids, docs = packed_row()
    labels = torch.randint(0, 97, ids.shape)
    packed = model(ids[None], labels=labels[None], document_ids=docs[None]).losses[0]
    alone = [model(i[None], labels=lab[None]).losses[0] for i, lab in zip(pieces(ids, LENGTHS), pieces(labels, LENGTHS))]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-10, atol=1e-10)


def test_bad_document_ids(model):
    ids, docs = packed_row()
    for bad, match in [(docs[None].float(), "int64 or int32"), (docs[None, :-1], "input_ids' shape"),
                       (docs.flip(0)[None], "non-decreasing")]:
        with pytest.raises(ValueError, match=match):
            model(ids[None], document_ids=bad)

