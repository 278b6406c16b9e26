"""experiments/documents.py's bookkeeping on a small random model: every view predicts the same tokens
of each document, the packed view equals each document scored alone, and so does the stream for the
first document of each stream (which starts from a fresh state)."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

import samba_lm

PATH = Path(__file__).resolve().parents[1] / "experiments" / "documents.py"
spec = importlib.util.spec_from_file_location("experiment_documents", PATH)
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)

EOS = 0


def small_model():
    cfg = samba_lm.SambaConfig.from_preset("tiny", vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,
                                           mlp_hidden=64, window=8, layers=("mamba", "mlp", "swa", "mlp"))
    torch.manual_seed(0)
    model = samba_lm.SambaLM(cfg)
    model.init_weights()
    return model.double().eval()


def documents(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(1, 64, (n,), generator=g), torch.tensor([EOS])]) for n in lengths]


def test_views_agree_where_they_must():
    docs = documents([5, 17, 2, 30, 9, 1, 12])
    views = experiment.score_views(small_model(), docs, EOS, n_rows=3, chunk=7, views=experiment.VIEWS)
    streams = experiment.stream_rows(docs, 3)
    assert [i for row in streams for i in row] == list(range(len(docs))) and len(streams) == 3
    for view, scored in views.items():
        assert [len(x) for _, x in scored["per_doc"]] == [len(d) - 1 for d in docs], view
    alone, packed, stream = (views[v]["per_doc"] for v in ("alone", "packed", "stream"))
    for (_, a), (_, p) in zip(alone, packed):
        np.testing.assert_allclose(p, a, rtol=0, atol=1e-10)
    for row in streams:
        np.testing.assert_allclose(stream[row[0]][1], alone[row[0]][1], rtol=0, atol=1e-10)
        assert math.isnan(stream[row[0]][0]) and all(not math.isnan(stream[i][0]) for i in row[1:])
    assert not np.allclose(stream[streams[0][1]][1], alone[streams[0][1]][1])  # the state carried over
    assert all(math.isnan(f) for f, _ in alone) and not any(math.isnan(f) for f, _ in views["after_eos"]["per_doc"])


def test_summarize_counts_every_position_once():
    per_doc = [(math.nan, np.full(n, float(n))) for n in (1, 3, 20)] + [(2.0, np.ones(5))]
    s = experiment.summarize(per_doc)
    assert s["tokens"] == 29 == sum(b["tokens"] for b in s["buckets"])
    assert s["first_token_nll"] == 2.0
    assert [(b["start"], b["tokens"]) for b in s["buckets"]] == [(1, 4), (2, 6), (4, 14), (16, 5)]
    assert math.isclose(s["nll"], (1 + 9 + 400 + 5) / 29)


class _Stream:
    def __init__(self, tokens):
        self.tokens = np.array(tokens, dtype=np.int64)

    def __len__(self):
        return len(self.tokens)

    def read(self, start, n):
        return self.tokens[start:start + n]


class _Shards:
    eos_id = EOS

    def __init__(self, tokens):
        self.stream = _Stream(tokens)

    def split(self, name):
        return self.stream


def test_held_out_documents_are_whole_and_within_budget():
    shards = _Shards([5, 6, EOS, 7, EOS, 8, 9, 10, EOS])
    assert [d.tolist() for d in experiment.held_out_documents(shards, 5)] == [[5, 6, EOS], [7, EOS]]
    assert len(experiment.held_out_documents(shards, 1)) == 1  # at least one document
    assert len(experiment.held_out_documents(shards, 100)) == 3
