"""save_pretrained / load_pretrained: exact round trip, and clear errors for broken directories."""

import json

import pytest
import torch

import samba_lm

from conftest import small_config, small_model


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_exact(tmp_path, tied):
    model = small_model(torch.float32, tie_embeddings=tied)
    samba_lm.save_pretrained(model, tmp_path / "m")
    loaded = samba_lm.load_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert not any(p.is_meta for p in loaded.parameters())


def test_load_with_dtype(tmp_path):
    samba_lm.save_pretrained(small_model(torch.float32), tmp_path)
    loaded = samba_lm.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        samba_lm.load_pretrained(tmp_path / "nowhere")
    samba_lm.save_pretrained(small_model(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        samba_lm.load_pretrained(tmp_path)


def test_truncated_weights(tmp_path):
    samba_lm.save_pretrained(small_model(), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        samba_lm.load_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config(tmp_path):
    samba_lm.save_pretrained(small_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mlp_hidden"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its config.*wrong shape"):
        samba_lm.load_pretrained(tmp_path)
    cfg["mlp_hidden"], cfg["tie_embeddings"] = 48, False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing \\['lm_head.weight'\\]"):
        samba_lm.load_pretrained(tmp_path)


def test_bad_config_file(tmp_path):
    samba_lm.save_pretrained(small_model(), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        samba_lm.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "samba-lm/1", **small_config().to_dict(),
                                                      "d_model": -4}))
    with pytest.raises(ValueError, match="SambaConfig.d_model"):
        samba_lm.load_pretrained(tmp_path)
