"""``lyco.lycoris_model``: a LycoModel from a LyCORIS config (SimpleTuner's ``lycoris_config.json``) has the modules,
shapes and scales of lyco's LyCORIS network for the same config, and of lycoris-lora's (file keys and outputs)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import lyco
from lyco.network import create_lycoris
from lycoris_cases import ATOL, MOVED, base_root, run

CONFIGS = {
    "lokr-full": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
                  "apply_preset": {"target_module": ["Net"], "module_algo_map": {"Net": {"factor": 2}}}},
    "locon": {"algo": "locon", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2, "conv_dim": 2, "conv_alpha": 1,
              "apply_preset": {"target_module": ["Net"]}},
    "loha-dora": {"algo": "loha", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 4, "dora_wd": True,
                  "apply_preset": {"target_module": ["Net"]}},
}  # fmt: skip


def _shake(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lycoris_model_equals_the_network_and_lycoris_lora(name, tmp_path):
    cfg = CONFIGS[name]
    base = base_root()
    model = lyco.lycoris_model(copy.deepcopy(base), cfg)
    _shake(model)
    lyco.save_lycoris(model, tmp_path / "m.safetensors")
    rest = {k: v for k, v in cfg.items() if k not in ("multiplier", "linear_dim", "linear_alpha")}
    net_model = copy.deepcopy(base)
    net = create_lycoris(net_model, cfg["multiplier"], cfg["linear_dim"], cfg["linear_alpha"], **rest)
    net.load_weights(tmp_path / "m.safetensors")
    net.apply_to()
    assert (run(model) - run(base)).abs().max() > MOVED
    torch.testing.assert_close(run(net_model), run(model), atol=ATOL, rtol=0)
    # lycoris-lora builds the same modules (keys and shapes) from the same config and computes the same outputs
    from lycoris import LycorisNetwork
    from lycoris import create_lycoris as lycoris_create

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    preset = cfg["apply_preset"]  # lycoris-lora's presets are global class state: set every key, every time
    LycorisNetwork.apply_preset({"target_module": preset["target_module"], "target_name": [], "exclude_name": [],
                                 "module_algo_map": preset.get("module_algo_map", {}), "name_algo_map": {},
                                 "use_fnmatch": False})  # fmt: skip
    ref_model = copy.deepcopy(base)
    ref = lycoris_create(ref_model, cfg["multiplier"], cfg["linear_dim"], cfg["linear_alpha"],
                         **{k: v for k, v in rest.items() if k != "apply_preset"})  # fmt: skip
    ref.apply_to()
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ref.load_state_dict(net.state_dict())
    torch.testing.assert_close(run(ref_model), run(model), atol=ATOL, rtol=0)


def test_full_matrix_lokr_trains_at_scale_one_and_multiplier_scales(tmp_path):
    cfg = dict(CONFIGS["lokr-full"], multiplier=0.5)
    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps(cfg))
    model = lyco.lycoris_model(base_root(), path)  # a JSON file, as SimpleTuner passes it
    adapters = [layer.lyco_adapters["default"] for _, layer in model.adapted_layers()]
    assert adapters and all(a.base_scaling == 1.0 and a.scaling == 0.5 for a in adapters)


def test_lycoris_model_errors():
    with pytest.raises(lyco.ConfigError, match="adapts no module"), pytest.warns(UserWarning, match="Nothing"):
        lyco.lycoris_model(base_root(), {"algo": "lora", "apply_preset": {"target_module": ["Nothing"]}})
    with pytest.raises(lyco.ConfigError, match="diag-oft"):
        lyco.lycoris_model(base_root(), {"algo": "diag-oft", "apply_preset": {"target_module": ["Net"]}})
    with pytest.raises(lyco.ConfigError, match="train_norm"):
        lyco.lycoris_model(base_root(), {"algo": "lora", "train_norm": True})
    with pytest.raises(lyco.ConfigError, match="unknown preset key"):
        lyco.lycoris_model(base_root(), {"algo": "lora", "apply_preset": {"target_modules": ["Net"]}})
    base = base_root()
    before = set(base.state_dict())
    with pytest.raises(lyco.ConfigError, match="factor"):
        lyco.lycoris_model(base, {"algo": "lokr", "factor": "x", "apply_preset": {"target_module": ["Net"]}})
    assert set(base.state_dict()) == before  # untouched: no wrapped layer


def test_conv_dim_zero_means_the_linear_dim_as_in_lycoris():
    """lycoris-lora reads conv_dim 0 (kohya passes "0") as "the linear dim"; convs are left out by enable_conv only."""
    from lyco.lycoris_config import LycorisOptions

    for value in (0, "0", None):
        options = LycorisOptions.from_kwargs(8, 4, {"conv_dim": value, "conv_alpha": value})
        assert (options.conv_dim, options.conv_alpha) == (8, 4.0)
    assert LycorisOptions.from_kwargs("8", "4", {"conv_dim": "2"}).conv_dim == 2
