"""Loading builds adapters from the tensors' shapes, never by recomputing a factorization."""

from __future__ import annotations

import copy

import torch
from torch import nn

import lyco
from lyco.ops import infer_lokr_plan

TOL = 1e-6  # fp32, same weights


def test_peft_dir_with_a_split_the_config_would_not_plan_loads_exactly(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Linear(6, 12))
    reference = copy.deepcopy(base)
    # factor 8 on (8, 4): lokr_w1 (1, 2), lokr_w2 (8, 2, 3, 3) — plan_lokr with decompose_factor=-1 gives (2, 2) ⊗ (4, 2)
    plans = {"0": infer_lokr_plan({"lokr_w1": (1, 2), "lokr_w2": (8, 2, 3, 3)}, (8, 4, 3, 3))}
    cfg = lyco.LoKrConfig(r=4, alpha=4, target_modules=["0", "2"], init_weights=False)
    model = lyco.get_model(base, cfg, plans=plans)
    assert model.model[0].lyco_adapters["default"].lokr_w1.shape == (1, 2)
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = lyco.LycoModel.from_pretrained(reference, tmp_path)
    assert loaded.model[0].lyco_adapters["default"].lokr_w2.shape == (8, 2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=TOL, rtol=TOL)
        with loaded.disable_adapter():
            assert (loaded(x) - expected).abs().max() > 1e-3  # the adapter really moves the output
