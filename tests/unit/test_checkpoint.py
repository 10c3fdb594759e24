"""Device checkpoints: a save at a round and step already saved writes a new folder, so a crash mid-save always
leaves ``LATEST`` naming a complete checkpoint."""

import os
import shutil

import pytest
import torch

from device_sdk.checkpoint import LATEST, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from device_sdk.config import TrainConfig
from device_sdk.train import init_train_state

from ..conftest import make_model

CFG = TrainConfig(steps=4, batch_size=2, context=16, precision="fp32")


def _lora_b(model) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_saving_the_same_round_and_step_again_never_touches_the_checkpoint_latest_names(tmp_path, monkeypatch):
    model = make_model("tiny-llama", n_specialists=1)
    state = init_train_state(model, CFG)
    with torch.no_grad():
        _lora_b(model).fill_(1.0)
    first = save_checkpoint(tmp_path, model, state, "tiny-llama", {"round": 2})
    assert first.name == "ckpt-000002-00000000"

    with torch.no_grad():
        _lora_b(model).fill_(2.0)
    real_replace = os.replace

    def crash_before_latest(src, dst):  # the process dies once the new folder is written, before LATEST moves
        if str(dst).endswith(LATEST):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_latest)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, state, "tiny-llama", {"round": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert latest_checkpoint(tmp_path) == first  # still complete: the same name was never rewritten in place
    restored = make_model("tiny-llama", n_specialists=1)
    load_checkpoint(first, restored, init_train_state(restored, CFG), "tiny-llama")
    assert torch.all(_lora_b(restored) == 1.0)

    again = save_checkpoint(tmp_path, model, state, "tiny-llama", {"round": 2})
    assert again.name.startswith("ckpt-000002-00000000-r") and latest_checkpoint(tmp_path) == again
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [again.name]  # older ones removed once LATEST moved
    load_checkpoint(again, restored, init_train_state(restored, CFG), "tiny-llama")
    assert torch.all(_lora_b(restored) == 2.0)


def test_a_pointer_to_a_lost_checkpoint_falls_back_to_the_newest_complete_one_or_says_so(tmp_path, caplog):
    model = make_model("tiny-llama", n_specialists=1)
    state = init_train_state(model, CFG)
    older = save_checkpoint(tmp_path, model, state, "tiny-llama", {"round": 1})
    keep = tmp_path / "keep"
    older.rename(keep)  # save_checkpoint removes older folders: keep this one aside, then put it back
    state.step = 3
    newest = save_checkpoint(tmp_path, model, state, "tiny-llama", {"round": 2})
    keep.rename(older)
    (newest / "state.json").unlink()  # files lost outside the SDK (a cleaner app, a full disk)
    assert latest_checkpoint(tmp_path) == older and "resuming from the newest complete one" in caplog.text
    shutil.rmtree(older)
    with pytest.raises(CheckpointError, match="names 'ckpt-000002-00000003', which is gone or incomplete"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "none") is None  # a device that never saved: a fresh start
