"""lycoris-lora as oracle: its network files load in lyco with equal outputs, and lyco's files load in it.

Observed lycoris-lora 4.1.3 behaviour these tests pin down (see docs/architecture.md):
- keys ``lycoris_<path with _>.<param>`` plus a 0-dim float ``.alpha`` per module; ``save_weights`` adds no
  metadata; conv LoKr ``lokr_w2_b`` is ``(r, in_r·k·k)``; CP cores are ``(r, r, *k)`` (Conv1d ``(r, r, k)``);
  a LoKr with both factors full stores ``alpha = r`` and uses scale 1.
- it cannot reload its own files when the saved split differs from what its factor search guesses, nor a
  LoKr CP file whose ``w1`` is full (it takes ``w2_a.shape[1]`` — ``out_r`` in CP layout — as the rank);
- ``merge_to`` applies ``alpha / r`` twice; its bypass forward (4.1.3) applies it once, like its rebuild forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lyco
from lycoris_cases import ATOL, LAYERS, MOVED, base_root, lycoris_load, lycoris_net, run

pytest.importorskip("lycoris")

R2 = {"linear_dim": 2, "linear_alpha": 3, "conv_dim": 2, "conv_alpha": 3}
R1 = {"linear_dim": 1, "linear_alpha": 3, "conv_dim": 1, "conv_alpha": 3}
SPLIT_BUG = "lycoris-lora 4.1.3 cannot reload a LoKr whose saved split differs from its factor guess"
WD_BUG = "lycoris-lora 4.1.3 reloads DoRA only on the output axis (make_module_from_state_dict drops wd_on_out)"
CP_BUG = "lycoris-lora 4.1.3 cannot reload a LoKr CP (use_tucker) module whose w1 is full (rank read from w2_a)"

# (id, create_lycoris kwargs, excluded modules, reason lycoris-lora cannot reload the file or None)
CASES = [
    ("full", {"algo": "full", **R2}, (), None),  # diff + diff_b, no alpha, scale 1
    ("lora", {"algo": "lora", **R2}, (), None),
    ("locon-tucker", {"algo": "locon", "use_tucker": True, **R2}, (), None),
    ("lora-rs", {"algo": "lora", "rs_lora": True, **R2}, (), None),  # files store alpha·√r
    ("loha", {"algo": "loha", **R2}, (), None),
    ("loha-tucker", {"algo": "loha", "use_tucker": True, **R2}, (), None),
    # small (4→8): w2 (4, 2, 3, 3) full since r >= max(4, 2)/2, so both factors full there → scale 1
    ("lokr", {"algo": "lokr", **R2}, (), None),
    ("lokr-factor4", {"algo": "lokr", "factor": 4, **R1}, (), SPLIT_BUG),  # conv 8→32: w1 (4, 4) guessed (2, 4)
    ("lokr-decompose-both-tucker", {"algo": "lokr", "decompose_both": True, "use_tucker": True, **R1},
     ("net.small",), None),
    ("lokr-full-matrix", {"algo": "lokr", "full_matrix": True, **R2}, (), None),  # alpha 3 ≠ r: scale 1
    # factor 8: small gets lokr_w1 (1, 2), lokr_w2 (8, 2, 3, 3) — not what factorization(8) gives
    ("lokr-factor8-full", {"algo": "lokr", "factor": 8, "full_matrix": True, **R2}, (), SPLIT_BUG),
    ("lokr-tucker-w1-full", {"algo": "lokr", "use_tucker": True, **R1}, (), CP_BUG),
    # use_scalar: lycoris-lora folds the (random) scalar into the first factor on save; lyco loads it as 1
    ("lora-scalar", {"algo": "lora", "use_scalar": True, **R2}, (), None),
    ("loha-scalar", {"algo": "loha", "use_scalar": True, **R2}, (), None),
    ("lokr-scalar", {"algo": "lokr", "use_scalar": True, **R2}, (), None),
    # rs_lora: files store alpha·√r. net.small is full–full at r=2, where lycoris-lora's own forward scales by
    # √r but its file (and every reader) by 1 — excluded (lyco keeps scale 1 there, as its files say)
    ("loha-rs", {"algo": "loha", "rs_lora": True, **R2}, (), None),
    ("lokr-rs", {"algo": "lokr", "rs_lora": True, **R2}, ("net.small",), None),
    ("lokr-unbalanced", {"algo": "lokr", "unbalanced_factorization": True, **R1}, (), SPLIT_BUG),
    # DoRA (lycoris_net randomises dora_scale too, so the magnitudes matter); create_lycoris spells it dora_wd
    ("lora-dora", {"algo": "lora", "dora_wd": True, **R2}, (), None),
    ("locon-dora-tucker", {"algo": "locon", "dora_wd": True, "use_tucker": True, **R2}, (), None),
    ("loha-dora", {"algo": "loha", "dora_wd": True, **R2}, (), None),
    ("lokr-dora", {"algo": "lokr", "dora_wd": True, **R2}, (), None),
    ("lora-dora-in", {"algo": "lora", "dora_wd": True, "wd_on_output": False, **R2}, (), WD_BUG),
    ("loha-dora-in", {"algo": "loha", "dora_wd": True, "wd_on_output": False, **R2}, (), WD_BUG),
    ("lokr-dora-in", {"algo": "lokr", "dora_wd": True, "wd_on_output": False, **R2}, (), WD_BUG),
]  # fmt: skip
IDS = [c[0] for c in CASES]


def _lycoris_file(tmp_path, kwargs, exclude):
    base = base_root()
    model, net = lycoris_net(base, exclude, **kwargs)
    expected = run(model)
    assert (expected - run(base)).abs().max() > MOVED
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, None)
    return base, expected, path


@pytest.mark.parametrize(("name", "kwargs", "exclude", "bug"), CASES, ids=IDS)
def test_lycoris_file_loads_in_lyco(tmp_path, name, kwargs, exclude, bug):
    base, expected, path = _lycoris_file(tmp_path, kwargs, exclude)
    model = lyco.load_lycoris(copy.deepcopy(base), path)
    torch.testing.assert_close(run(model), expected, atol=ATOL, rtol=0)
    # lyco's merge equals lycoris-lora's forward (its merge_to would apply alpha/r twice)
    torch.testing.assert_close(run(model.merge_and_unload()), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("name", "kwargs", "exclude", "bug"),
    [pytest.param(*c, marks=[pytest.mark.xfail(strict=True, reason=c[3])] if c[3] else []) for c in CASES],
    ids=IDS,
)
def test_lyco_file_loads_in_lycoris(tmp_path, name, kwargs, exclude, bug):
    base, expected, path = _lycoris_file(tmp_path, kwargs, exclude)
    model = lyco.load_lycoris(copy.deepcopy(base), path)
    out = tmp_path / "lyco.safetensors"
    lyco.save_lycoris(model, out)
    torch.testing.assert_close(run(lycoris_load(base, out)), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("name", "kwargs", "exclude", "bug"), [c for c in CASES if c[3]], ids=[c[0] for c in CASES if c[3]])
def test_lycoris_own_reload_bug_and_lyco_roundtrip(tmp_path, name, kwargs, exclude, bug):
    """The file lycoris-lora cannot reload round-trips through lyco with identical outputs."""
    base, expected, path = _lycoris_file(tmp_path, kwargs, exclude)
    with pytest.raises((RuntimeError, AttributeError)):  # its own loader fails on its own file
        lycoris_load(base, path)
    model = lyco.load_lycoris(copy.deepcopy(base), path)
    out = tmp_path / "lyco.safetensors"
    lyco.save_lycoris(model, out)
    torch.testing.assert_close(run(lyco.load_lycoris(copy.deepcopy(base), out)), expected, atol=ATOL, rtol=0)


def test_full_matrix_split_is_read_from_shapes(tmp_path):
    """Conv2d 4→8 at factor 8: lokr_w1 (1, 2), lokr_w2 (8, 2, 3, 3) — lyco keeps that split (no refactorizing)."""
    base, _, path = _lycoris_file(tmp_path, {"algo": "lokr", "factor": 8, "full_matrix": True, **R2}, ())
    model = lyco.load_lycoris(copy.deepcopy(base), path)
    adapter = model.model.net.small.lyco_adapters["default"]
    assert tuple(adapter.lokr_w1.shape) == (1, 2) and tuple(adapter.lokr_w2.shape) == (8, 2, 3, 3)
    assert adapter.scaling == 1.0  # both factors full: scale 1 whatever the file's alpha


# lyco-native adapters (PEFT-style configs) saved as LyCORIS files, loaded by lycoris-lora
NATIVE = [
    ("full", lyco.FullConfig(target_modules=LAYERS, init_weights=False)),
    ("loha", lyco.LoHaConfig(r=2, alpha=3, target_modules=LAYERS, init_weights=False)),
    ("loha-effective-conv", lyco.LoHaConfig(r=2, alpha=3, target_modules=LAYERS, use_effective_conv2d=True,
                                             init_weights=False)),
    # r=2: small has both factors full, where lyco scales by alpha/r = 1.5 → folded into lokr_w1 on save
    ("lokr", lyco.LoKrConfig(r=2, alpha=3, target_modules=LAYERS, init_weights=False)),
    ("lokr-full-alpha", lyco.LoKrConfig(r=8, alpha=2, target_modules=LAYERS, init_weights=False)),
    ("lokr-patterns", lyco.LoKrConfig(r=1, alpha=0.5, target_modules=LAYERS, rank_pattern={"fc": 2},
                                       alpha_pattern={"conv1d": 4.0}, init_weights=False)),
    ("lokr-both-cp", lyco.LoKrConfig(r=1, alpha=3, target_modules=LAYERS[1:], decompose_both=True,
                                      use_effective_conv2d=True, init_weights=False)),
    # init_weights=False starts the scalar at 1; the test sets it to 0.7 before saving (folded into the file)
    ("lora-scalar-tucker", lyco.LoRAConfig(r=2, alpha=3, target_modules=LAYERS, use_scalar=True,
                                            use_effective_conv2d=True, init_weights=False)),
    ("loha-rslora-scalar", lyco.LoHaConfig(r=2, alpha=3, target_modules=LAYERS, use_rslora=True, use_scalar=True,
                                            init_weights=False)),
    ("lokr-rslora", lyco.LoKrConfig(r=2, alpha=3, target_modules=LAYERS, use_rslora=True, init_weights=False)),
    ("lokr-full-matrix", lyco.LoKrConfig(r=2, alpha=3, target_modules=LAYERS, full_matrix=True, init_weights=False)),
    # DoRA: the test shakes dora_scale (at init it makes DoRA equal to the plain form)
    ("lora-dora", lyco.LoRAConfig(r=2, alpha=3, target_modules=LAYERS, use_dora=True, init_weights=False)),
    ("loha-dora-scalar", lyco.LoHaConfig(r=2, alpha=3, target_modules=LAYERS, weight_decompose=True, use_scalar=True,
                                          init_weights=False)),
    ("lokr-dora-cp", lyco.LoKrConfig(r=1, alpha=3, target_modules=LAYERS[1:], weight_decompose=True, decompose_both=True,
                                      use_effective_conv2d=True, init_weights=False)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "config"), NATIVE, ids=[n for n, _ in NATIVE])
def test_lyco_native_adapter_loads_in_lycoris(tmp_path, name, config):
    base = base_root()
    torch.manual_seed(3)
    model = lyco.get_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scalar"):
                p.fill_(0.7)
            if name.endswith(".dora_scale"):
                p.mul_(torch.rand_like(p) + 0.5)
    expected = run(model)
    assert (expected - run(base)).abs().max() > MOVED
    path = tmp_path / "a.safetensors"
    lyco.save_lycoris(model, path)
    torch.testing.assert_close(run(lycoris_load(base, path)), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(lyco.load_lycoris(copy.deepcopy(base), path)), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lyco_matches_lycoris_bypass_forward(tmp_path, algo):
    base = base_root()
    model, net = lycoris_net(base, bypass_mode=True, algo=algo, **R2)
    expected = run(model)
    path = tmp_path / "b.safetensors"
    net.save_weights(str(path), torch.float32, None)
    torch.testing.assert_close(run(lyco.load_lycoris(copy.deepcopy(base), path)), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_merge_applies_scale_twice_lyco_merge_does_not(tmp_path, algo):
    """Regression: lyco's merge equals the forward; lycoris-lora's merge_to scales the delta by alpha/r twice."""
    base = base_root()
    model, net = lycoris_net(base, exclude=("net.small",), algo=algo, **R2)
    expected = run(model)
    path = tmp_path / "m.safetensors"
    net.save_weights(str(path), torch.float32, None)
    net.restore()
    net.merge_to(1.0)
    # the fc layer alone: its merged delta is 1.5× (alpha / r = 3 / 2) the forward's
    h = torch.randn(3, 64)
    loaded = lyco.load_lycoris(copy.deepcopy(base), path)
    fc_delta = loaded.model.net.fc(h) - base.net.fc(h)
    torch.testing.assert_close(model.net.fc(h) - base.net.fc(h), 1.5 * fc_delta, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(run(loaded.merge_and_unload()), expected, atol=ATOL, rtol=0)
