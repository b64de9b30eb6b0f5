"""DyLoRA files load as LoRA: lycoris-lora 4.1.3's own DyLoRA ``save_weights`` output, and a file in the layout of
kohya sd-scripts' ``networks/dylora.py`` (its ``state_dict`` also writes ``lora_down``/``lora_up``/``alpha``).

Observed lycoris-lora 4.1.3 DyLoRA behaviour these tests pin down:
- it saves the concatenated blocks as ``lora_down`` ``(r, in, *k)`` and ``lora_up`` ``(out, r)`` — 2-D even for
  convolutions (kohya: ``(out, r, 1, 1)``) — plus ``alpha``, int64 when ``linear_alpha`` is an int;
- its forward draws a random rank on every call, eval mode included, and scales by ``alpha / blocks used``, not
  ``alpha / r``; its own loader cannot reload a conv DyLoRA file (2-D up into LoCon's ``(out, r, 1, 1)``).
The reference is therefore ``W + alpha / r · up @ down`` built from the DyLoRA blocks — what LoRA readers compute
from these files, kohya's DyLoRA at full rank included — and, for the Linear-only file, lycoris-lora's own loader.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import lyco
from lycoris_cases import ATOL, MOVED, base_root, lycoris_load, lycoris_net, run

pytest.importorskip("lycoris")

DY = {"algo": "dylora", "linear_dim": 8, "linear_alpha": 4, "conv_dim": 8, "conv_alpha": 4, "block_size": 2}
CONVS = ("net.small", "net.conv", "net.pw", "net.conv1d")


def _dylora(tmp_path, exclude=()):
    """A seeded lycoris-lora DyLoRA (random up and down blocks), its file and ``{path: (up, down, alpha)}``."""
    base = base_root()
    _, net = lycoris_net(base, exclude, **DY)
    path = tmp_path / "dylora.safetensors"
    net.save_weights(str(path), None, None)
    factors = {
        m.lora_name.removeprefix("lycoris_").replace("_", "."): (
            torch.cat(list(m.up_list), 1).detach(),
            torch.cat(list(m.down_list)).detach(),
            float(m.alpha),
        )
        for m in net.loras
    }
    return base, net, path, factors


def _merged(base, factors):
    """``base`` with ``W += alpha / r · up @ down`` on every adapted layer (plain LoRA semantics of the file)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, (up, down, alpha) in factors.items():
            w = model.get_submodule(name).weight
            w += (alpha / down.shape[0] * up @ down).view(w.shape)
    return model


def _check(base, path, factors):
    af = lyco.formats.read_adapter(path)
    assert af.algos() == {"lora"} and len(af.modules) == len(factors)
    expected = run(_merged(base, factors))
    assert (expected - run(base)).abs().max() > MOVED
    got = run(lyco.load_lycoris(copy.deepcopy(base), path))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)  # fp32, atol 1e-5
    return expected


def test_lycoris_dylora_linear_file_loads_as_lora(tmp_path):
    base, net, path, factors = _dylora(tmp_path, exclude=CONVS)
    assert set(factors) == {"net.fc"}
    assert set(load_file(path)) == {
        f"lycoris_net_fc.{k}" for k in ("alpha", "lora_up.weight", "lora_down.weight")
    }
    expected = _check(base, path, factors)
    # lycoris-lora reads its own Linear DyLoRA file as LoCon and agrees
    torch.testing.assert_close(run(lycoris_load(base, path)), expected, atol=ATOL, rtol=0)
    # its forward at full rank (all 4 blocks) scales by alpha / 4 blocks = block_size × the file's alpha / r
    (m,) = net.loras
    up, down, alpha = factors["net.fc"]
    full, _ = m.get_diff_weight(rank=m.lora_dim - m.block_size)
    torch.testing.assert_close(full, m.block_size * alpha / m.lora_dim * up @ down)


def test_lycoris_dylora_conv_file_loads_as_lora(tmp_path):
    """Conv2d 3×3 and 1×1, Conv1d and Linear, with lycoris-lora's 2-D conv ``lora_up``."""
    base, _, path, factors = _dylora(tmp_path)
    assert set(factors) == {"net.small", "net.fc", *CONVS}
    sd = load_file(path)
    assert sd["lycoris_net_conv.lora_up.weight"].shape == (32, 8)
    assert sd["lycoris_net_conv.lora_down.weight"].shape == (8, 8, 3, 3)
    _check(base, path, factors)


def test_kohya_dylora_file_loads_as_lora(tmp_path):
    """kohya's DyLoRA (Linear and Conv2d only) writes conv ups as ``(out, r, 1, 1)`` under ``lora_unet_`` keys."""
    base, _, _, factors = _dylora(tmp_path, exclude=("net.conv1d",))
    sd = {}
    for name, (up, down, alpha) in factors.items():
        w = base.get_submodule(name).weight
        stem = "lora_unet_" + name.replace(".", "_")
        conv = w.dim() == 4
        sd[f"{stem}.lora_down.weight"] = down.reshape(down.shape[0], *w.shape[1:]) if conv else down.clone()
        sd[f"{stem}.lora_up.weight"] = up[..., None, None].clone() if conv else up.clone()
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "kohya_dylora.safetensors"
    save_file(sd, str(path))
    _check(base, path, factors)
