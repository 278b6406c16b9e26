"""`samba-lm convert`: each way through the command line, and its errors."""

import pytest
import torch

from samba_lm.checkpoint import load_pretrained, save_pretrained
from samba_lm.cli import main as cli

from conftest import small_model


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_both_ways(tmp_path):
    model = small_model(torch.float32, layers=("mamba", "mlp", "swa", "mlp"), d_state=16)  # their Mamba: d_state 16
    save_pretrained(model, tmp_path / "ours")
    cli(["convert", str(tmp_path / "ours"), "--to", "official", "--out", str(tmp_path / "official.pth")])
    cli(["convert", str(tmp_path / "official.pth"), "--from", "official", "--out", str(tmp_path / "back")])
    assert same_weights(load_pretrained(tmp_path / "back"), model)


@pytest.mark.parametrize("fmt, layers", [("llama", ("attn", "mlp")), ("mistral", ("swa", "mlp")),
                                         ("mamba", ("mamba",))])
def test_transformers_formats_both_ways(tmp_path, fmt, layers):
    pytest.importorskip("transformers")
    model = small_model(torch.float32, layers=layers * 2, tie_embeddings=False)
    save_pretrained(model, tmp_path / "ours")
    cli(["convert", str(tmp_path / "ours"), "--to", fmt, "--out", str(tmp_path / "hf")])
    cli(["convert", str(tmp_path / "hf"), "--from", fmt, "--out", str(tmp_path / "back")])
    assert same_weights(load_pretrained(tmp_path / "back"), model)


def test_errors(tmp_path, capsys):
    pytest.importorskip("transformers")
    samba = small_model(torch.float32, layers=("mamba", "mlp", "swa", "mlp"))
    save_pretrained(samba, tmp_path / "samba")
    llama = small_model(torch.float32, layers=("attn", "mlp") * 2, tie_embeddings=False)
    save_pretrained(llama, tmp_path / "llama")
    cli(["convert", str(tmp_path / "llama"), "--to", "llama", "--out", str(tmp_path / "hf")])
    cases = [
        (["--to", "llama", "--out", str(tmp_path / "x")], "samba", "match no transformers architecture"),
        (["--to", "mistral", "--out", str(tmp_path / "x")], "llama", "llama-shaped model; use --to llama"),
        (["--from", "mamba", "--out", str(tmp_path / "x")], "hf", "holds a llama model"),
        (["--to", "llama", "--config", "Samba_421M", "--out", str(tmp_path / "x")], "llama",
         "--config names an official Samba config"),
    ]
    for flags, source, message in cases:
        with pytest.raises(SystemExit) as e:
            cli(["convert", str(tmp_path / source), *flags])
        assert message in str(e.value), (flags, str(e.value))
    with pytest.raises(SystemExit):  # argparse: exactly one of --from / --to
        cli(["convert", str(tmp_path / "samba"), "--from", "official", "--to", "llama", "--out", str(tmp_path / "x")])
    assert "not allowed with argument" in capsys.readouterr().err
