"""Config fields from a newer PEFT are kept (and written back), with a warning, never fatal."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lyco


def test_unknown_peft_config_fields_are_kept_and_warned(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    lyco.get_model(net, lyco.LoHaConfig(r=2, target_modules=["0"], init_weights=False)).save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["use_future_trick"] = {"level": 3}
    cfg_path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="use_future_trick"):
        model = lyco.LycoModel.from_pretrained(nn.Sequential(nn.Linear(8, 8)), tmp_path)
    assert model.peft_config["default"].unknown_fields == {"use_future_trick": {"level": 3}}
    model.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert written["use_future_trick"] == {"level": 3}
    assert written["peft_type"] == "LOHA"
