"""The README quickstart runs as written and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
TOL = 1e-5  # merged vs adapter output, fp32


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert "trainable params" in capsys.readouterr().out
    assert (tmp_path / "my_adapter" / "adapter_model.safetensors").is_file()
    x = scope["x"]
    with torch.no_grad():
        adapted = scope["model"](x)
        assert torch.allclose(scope["merged"](x), adapted, atol=TOL)
        with scope["model"].disable_adapter():
            assert not torch.allclose(scope["model"](x), adapted, atol=TOL)  # the step really moved the output


def test_readme_peft_section_runs(tmp_path, monkeypatch, capsys):
    """The "Use lyco from PEFT code" block runs as written, and PEFT reads the folder it saves."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "get_peft_model_state_dict" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert capsys.readouterr().out.strip().endswith("['default']")
    assert set(scope["state"]) == {"0.lokr_w1", "0.lokr_w2"}  # 32×32 at r=4: both factors full
    peft = __import__("pytest").importorskip("peft")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    loaded = peft.PeftModel.from_pretrained(net, tmp_path / "peft_style")
    assert loaded.peft_config["default"].use_dora


def test_readme_simpletuner_section_runs(tmp_path, monkeypatch, capsys):
    """The "Use lyco from sd-scripts / SimpleTuner" block runs as written: 4 full-matrix LoKr modules at scale 1,
    a file with LyCORIS's keys, and the class preset put back afterwards."""
    import lyco
    from lyco.lycoris_config import Preset

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "create_lycoris" in b)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lyco.LycorisNetwork, "preset", Preset())
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert capsys.readouterr().out.strip() == "4 modules"
    from safetensors import safe_open

    with safe_open(tmp_path / "lokr.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"lycoris_0_to_q.lokr_w1", "lycoris_0_to_q.lokr_w2", "lycoris_2_to_out.alpha"} <= keys
    assert all(a.base_scaling == 1.0 for a in scope["network"].loras)  # not alpha / r = 1e-4
