"""``save_pretrained`` over an existing folder is all or nothing: a save that fails, is interrupted or is killed
leaves a folder that loads as exactly the old or exactly the new adapter, or that loading refuses naming it."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lyco

X = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))


def adapter(alpha: float, seed: int) -> lyco.LycoModel:
    """Same shapes for every alpha: weights of one save and the config of another still load, wrongly."""
    torch.manual_seed(seed)
    return lyco.get_model(base(), lyco.LoKrConfig(r=2, alpha=alpha, target_modules=["0", "2"], init_weights=False))


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


OLD, NEW = adapter(2.0, 1), adapter(8.0, 2)


def outcome(folder: Path) -> str:
    """``"old"``, ``"new"`` or ``"refused"`` (a FormatError naming the folder); anything else fails."""
    try:
        got = out(lyco.LycoModel.from_pretrained(base(), folder))
    except lyco.FormatError as exc:
        assert str(folder) in str(exc), exc
        return "refused"
    for name, model in (("old", OLD), ("new", NEW)):
        if torch.allclose(got, out(model), atol=1e-6, rtol=0):
            return name
    raise AssertionError(f"{folder} loads as neither adapter")


def test_failure_writing_the_config_leaves_the_old_folder(tmp_path, monkeypatch):
    OLD.save_pretrained(tmp_path)
    real = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith(".adapter_config.json."):
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        NEW.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert outcome(tmp_path) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_interrupted_between_the_two_files_is_refused(tmp_path, monkeypatch):
    """Killed after the weights were replaced, before the config was: new weights beside the old config."""
    OLD.save_pretrained(tmp_path)
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        NEW.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert Path(calls[0]).name == "adapter_model.safetensors"
    with pytest.raises(lyco.FormatError, match=r"does not match the config .*alpha"):
        lyco.LycoModel.from_pretrained(base(), tmp_path)
    NEW.save_pretrained(tmp_path)  # saving again mends it
    assert outcome(tmp_path) == "new"


def test_stale_temp_files_are_removed(tmp_path):
    OLD.save_pretrained(tmp_path)
    for name in (".adapter_model.safetensors.k1ll3d.tmp", ".adapter_config.json.x.tmp"):
        (tmp_path / name).write_bytes(b"half")
    NEW.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_peft_reads_the_weights_metadata_fine(tmp_path):
    peft = pytest.importorskip("peft")
    NEW.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["lyco_config"])["alpha"] == 8.0
    loaded = peft.PeftModel.from_pretrained(base(), tmp_path)
    torch.testing.assert_close(out(loaded), out(NEW), atol=1e-5, rtol=0)


def _save_forever(folder: str, ready) -> None:
    """Child process: announce, then save the two adapters in turn until killed."""
    ready.set()
    while True:
        NEW.save_pretrained(folder)
        OLD.save_pretrained(folder)


@pytest.mark.slow
def test_kill_9_during_save_pretrained(tmp_path):
    """60 children forked from a server that imported lyco once, each SIGKILLed at a random moment while
    saving over an existing folder: every folder loads as the old or the new adapter, or is refused."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["lyco", "torch", __name__])
    rng = random.Random(0)
    seen = {"old": 0, "new": 0, "refused": 0}
    for trial in range(60):
        folder = tmp_path / f"t{trial}"
        OLD.save_pretrained(folder)
        ready = ctx.Event()
        child = ctx.Process(target=_save_forever, args=(str(folder), ready))
        child.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        seen[outcome(folder)] += 1
    assert seen["old"] + seen["new"] + seen["refused"] == 60 and seen["old"] and seen["new"], seen
