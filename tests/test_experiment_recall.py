"""experiments/recall.py's pieces on small models: its passkey grid is samba_lm.eval.passkey's (the same
cells, keys, prompts, answers and scores) with a chunked prefill, the models it compares have matched
parameter counts, and the settings and flags resolve as documented."""

import importlib.util
from pathlib import Path

import pytest
import torch

import samba_lm
from samba_lm.data import train_tokenizer
from samba_lm.data.passkey import FILLER, INTRO, NEEDLE, QUESTION
from samba_lm.eval import passkey

PATH = Path(__file__).resolve().parents[1] / "experiments" / "recall.py"
spec = importlib.util.spec_from_file_location("experiment_recall", PATH)
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)


@pytest.fixture(scope="module")
def tok():
    texts = [INTRO, FILLER, QUESTION] + [NEEDLE.format(key=k) + f" {k}." for k in (12345, 67890, 40213, 99871)]
    return train_tokenizer(texts * 4, vocab_size=320)


def small_model(vocab: int):
    cfg = samba_lm.SambaConfig.from_preset("tiny", vocab_size=vocab, d_model=32, n_heads=2, n_kv_heads=1,
                                           head_dim=16, mlp_hidden=64, window=8, layers=("mamba", "mlp", "swa", "mlp"))
    torch.manual_seed(0)
    model = samba_lm.SambaLM(cfg)
    model.init_weights()
    return model.eval()


def test_the_grid_does_not_depend_on_the_prefill_chunk(tok):
    """recall.py prefills the grid's prompts in chunks (--prefill-chunk), for speed on a CPU."""
    model = small_model(tok.get_vocab_size())
    lengths, depths = [130], [0.0, 1.0]
    chunked = passkey.passkey_grid(model, tok, lengths, depths, n_keys=2, seed=3, max_new_tokens=2, progress=False,
                                   prefill_chunk=16)
    whole = passkey.passkey_grid(model, tok, lengths, depths, n_keys=2, seed=3, max_new_tokens=2, progress=False)
    assert chunked == whole


def test_models_are_matched_in_size():
    chosen = experiment.matched_args(["samba", "llama-swa", "mamba"], 64, 32, 2048, 1)
    sizes = {name: experiment.count_params(args, 2048) for name, args in chosen.items()}
    assert all(abs(n - sizes["samba"]) / sizes["samba"] < 0.2 for n in sizes.values()), sizes
    assert chosen["samba"]["layers"] == ("mamba", "mlp", "swa", "mlp")
    assert {a["window"] for a in chosen.values()} == {32}


def test_settings_and_flags(tmp_path):
    cpu = experiment.parse_args(["--setting", "cpu", "--ft-steps", "7"])
    assert cpu.ft_steps == 7 and cpu.d_model == experiment.SETTINGS["cpu"]["d_model"] and cpu.out == "runs/recall-cpu"
    gpu = experiment.parse_args(["--out", str(tmp_path)])
    assert gpu.setting == "gpu" and gpu.out == str(tmp_path) and len(gpu.depths) == 11 and gpu.keys == 5
    assert gpu.corpus == "shakespeare" and experiment.parse_args(["--corpus", "python-stdlib"]).corpus == "python-stdlib"
    for s in experiment.SETTINGS.values():  # the protocol: 1x to 64x the fine-tune length, fine-tune at 4 windows
        assert s["multiples"][0] == 1 and s["multiples"][-1] >= 64 and s["ft_len"] == 4 * s["window"]
    with pytest.raises(SystemExit):
        experiment.parse_args(["--models", "samba,gpt"])
