"""Packed documents: where each token's document begins, from the `document_ids` a caller gives.

`SambaLM(input_ids, document_ids=...)` takes an integer [B, T] tensor, non-decreasing along each row:
a token sees earlier tokens (attention) and inherits recurrent state (Mamba's conv and scan) only
from tokens of its row with the same id. The layers get that as `Documents`:
    reset [B, T] bool    the token is its document's first: the scan and the conv start afresh there
    start [B, T] int64   the position where its document began: attention sees no key before it, and
                         RoPE counts from it, so each document runs exactly as it would alone
With a state, the state remembers each row's last id and its start (`SambaState.doc`, `doc_start`):
a chunk whose first id is that id continues the document, any other id starts a new one. Without a
state every row's first token starts a document. A document that starts inside a row's left padding
(negative positions) starts at position 0, the row's first real token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_BEFORE_ANY = torch.iinfo(torch.int64).min


class Documents(NamedTuple):
    reset: torch.Tensor  # [B, T] bool
    start: torch.Tensor  # [B, T] int64


def document_starts(document_ids: torch.Tensor, positions: torch.Tensor, state=None) -> Documents:
    """The Documents of a chunk at `positions` [B, T], continuing `state`'s documents if given."""
    ids = document_ids.long()
    first = (ids[:, 0] != state.doc) if state is not None else torch.ones_like(ids[:, 0], dtype=torch.bool)
    reset = torch.cat([first[:, None], ids[:, 1:] != ids[:, :-1]], dim=1)
    # The latest reset at or before each token (positions increase along a row), else the state's start.
    start = torch.where(reset, positions, _BEFORE_ANY).cummax(dim=1).values
    if state is not None:
        start = torch.maximum(start, state.doc_start[:, None])
    return Documents(reset, start.clamp(min=0))


def documents_from_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """document_ids [B, T] for blocks cut from concatenated documents, each followed by EOS: a new
    document begins after every EOS (the EOS belongs to the document it ends)."""
    ends = (tokens == eos_id).long()
    return ends.cumsum(dim=1) - ends


def check_document_ids(document_ids, input_ids: torch.Tensor):
    """Integer, input_ids' shape and device, non-decreasing along each row (checked on a CPU; on a GPU
    by a device-side assertion, no sync; skipped while compiling or capturing)."""
    if not isinstance(document_ids, torch.Tensor) or document_ids.dtype not in (torch.int64, torch.int32):
        got = document_ids.dtype if isinstance(document_ids, torch.Tensor) else type(document_ids).__name__
        raise ValueError(f"document_ids must be an int64 or int32 tensor, got {got}")
    if document_ids.shape != input_ids.shape or document_ids.device != input_ids.device:
        raise ValueError(f"document_ids must have input_ids' shape {tuple(input_ids.shape)} on {input_ids.device}, "
                         f"got {tuple(document_ids.shape)} on {document_ids.device}")
    if torch.compiler.is_compiling() or document_ids.shape[1] < 2:
        return
    ordered = (document_ids[:, 1:] >= document_ids[:, :-1]).all()
    message = "document_ids must be non-decreasing along each row (one id per document, in order)"
    if document_ids.device.type == "cpu":
        if not ordered:
            raise ValueError(message)
    elif document_ids.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        torch._assert_async(ordered, message)
