"""save_pretrained / load_pretrained: exact round trip, and clear errors for broken directories; training
checkpoints verified before they are read."""

import json

import pytest
import torch

import samba_lm
from samba_lm.checkpoint import (model_from_training_checkpoint, newest_intact_checkpoint, read_checkpoint_meta,
                                 save_checkpoint, verify_checkpoint)

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


def test_a_saved_model_is_readable_by_everyone(tmp_path):
    samba_lm.save_pretrained(small_model(), tmp_path)
    assert {f.name: f.stat().st_mode & 0o777 for f in tmp_path.iterdir()} == {"config.json": 0o644,
                                                                              "model.safetensors": 0o644}


# ----------------------------------------------------------------------------- training checkpoints
def save_steps(root, steps):
    """Training checkpoints of a small model at `steps`, as the trainer writes them."""
    model = small_model(torch.float32)
    meta = {"model_config": model.config.to_dict()}
    return [save_checkpoint(root, step, {"model": model.state_dict()}, {"torch": torch.get_rng_state()}, meta)
            for step in steps]


def test_checkpoints_are_verified_against_the_sizes_they_were_written_with(tmp_path):
    old, new = save_steps(tmp_path, [3, 6])
    assert set(read_checkpoint_meta(new)["files"]) == {".metadata", "__0_0.distcp", "rank00000.pt"}
    assert verify_checkpoint(new)["step"] == 6
    shard = new / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"step_00000006 is damaged: .*__0_0\.distcp holds 100 bytes, [\d,]+ when"):
        verify_checkpoint(new)
    with pytest.raises(ValueError, match="__0_0.distcp holds 100 bytes"):
        model_from_training_checkpoint(new)
    found, passed_over = newest_intact_checkpoint(tmp_path)
    assert found == old and len(passed_over) == 1 and "step_00000006 is damaged" in passed_over[0]
    (old / "rank00000.pt").unlink()
    with pytest.raises(ValueError, match="rank00000.pt is missing"):
        verify_checkpoint(old)
    assert newest_intact_checkpoint(tmp_path)[0] is None
    (old / "meta.json").write_text("{trunc")
    with pytest.raises(ValueError, match="step_00000003 is damaged: .*meta.json is not valid JSON"):
        verify_checkpoint(old)


def test_a_damaged_checkpoint_from_before_the_sizes_fails_in_one_line(tmp_path):
    (path,) = save_steps(tmp_path, [3])
    meta = read_checkpoint_meta(path)
    del meta["files"]  # as checkpoints were written before meta.json listed them
    (path / "meta.json").write_text(json.dumps(meta))
    assert verify_checkpoint(path)["step"] == 3
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"step_00000003 could not be read \(.*\); it is damaged") as error:
        model_from_training_checkpoint(path)
    assert "\n" not in str(error.value)
