"""``ss_*`` metadata has one author (``lyco.formats.metadata.file_metadata``): a tool's values reach the file
unchanged, missing ``ss_network_*`` keys are computed from the tensors, values are strings as kohya writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lyco
from lyco import cli
from lyco.formats import AdapterFile, ModuleAdapter, read_adapter, write_lycoris_file
from lyco.formats.metadata import file_metadata


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})


def all_strings(args: dict) -> bool:
    return all(isinstance(v, str) for v in args.values())


def test_extract_metadata_is_what_was_asked_for(tmp_path: Path, capsys) -> None:
    """r=2 on 8×8 layers: every LoKr comes out with both factors full (no rank in the tensors), yet the file
    says ss_network_dim 2 — what extract was asked for, as kohya's scripts write it (it used to say 1)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tuned = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tuned.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()})
    for net, name in ((base, "base"), (tuned, "tuned")):
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
    out = tmp_path / "x.safetensors"
    argv = ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), str(out)]
    assert cli.main([*argv, "--algo", "lokr", "--rank", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert all(m.rank is None for m in read_adapter(out).modules.values())
    meta = metadata(out)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2")
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "lokr" and args["factor"] == "-1" and args["decompose_both"] == "False"
    assert all_strings(args) and args["full_matrix"] == "True"  # computed keys fill in what extract did not say


def test_declared_values_win_and_json_types_become_strings(tmp_path: Path) -> None:
    t = {"lokr_w1": torch.randn(2, 2), "lokr_w2_a": torch.randn(4, 1), "lokr_w2_b": torch.randn(1, 4)}
    declared = {"ss_network_dim": "16", "ss_network_args": json.dumps({"algo": "lokr", "use_tucker": False, "factor": 4,
                "preset": "attn-mlp"}), "sshs_model_hash": "stale", "ss_output_name": "kept"}  # fmt: skip
    af = AdapterFile({"fc": ModuleAdapter("lokr", t, alpha=1.0, weight_shape=(8, 8))}, metadata=declared)
    meta = file_metadata(af, {"ss_output_name": "user"})
    assert meta["ss_network_dim"] == "16"  # declared: unchanged (the tensors say 1)
    assert meta["ss_network_alpha"] == "1.0" and meta["ss_network_module"] == "lycoris.kohya"  # computed: missing
    assert "sshs_model_hash" not in meta and meta["ss_output_name"] == "user"
    args = json.loads(meta["ss_network_args"])
    assert args == {"algo": "lokr", "use_tucker": "False", "factor": "4", "preset": "attn-mlp"} | {
        k: v for k, v in args.items() if k not in ("algo", "use_tucker", "factor", "preset")
    }
    assert all_strings(args) and args["use_tucker"] == "False" and args["factor"] == "4"
    path = tmp_path / "a.safetensors"
    write_lycoris_file(af, path)
    assert metadata(path)["ss_network_dim"] == "16"


def test_saved_model_args_are_strings(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(64, 64))  # conv: CP w2; linear: w1 factored
    model = lyco.get_model(net, lyco.LoKrConfig(r=2, target_modules=["0", "2"], decompose_both=True,
                                                use_effective_conv2d=True, init_weights=False))  # fmt: skip
    path = tmp_path / "m.safetensors"
    lyco.save_lycoris(model, path)
    args = json.loads(metadata(path)["ss_network_args"])
    assert all_strings(args) and args["use_tucker"] == "True" and args["decompose_both"] == "True"


def test_resize_states_the_new_ranks(tmp_path: Path, capsys) -> None:
    model = lyco.get_model(nn.Sequential(nn.Linear(16, 16)), lyco.LoHaConfig(r=4, alpha=4, init_weights=False,
                                                                              target_modules=["0"]))  # fmt: skip
    src, out = tmp_path / "r4.safetensors", tmp_path / "r2.safetensors"
    lyco.save_lycoris(model, src, metadata={"ss_output_name": "mine"})
    assert metadata(src)["ss_network_dim"] == "4"
    assert cli.main(["resize", str(src), str(out), "--rank", "2", "--steps", "5", "--no-progress"]) == 0
    capsys.readouterr()
    meta = metadata(out)
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0" and meta["ss_output_name"] == "mine"


def _unet(**extra):
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, **extra,
    )  # fmt: skip


def test_base_model_version_is_written_for_sd_families(tmp_path):
    """kohya's ss_base_model_version / ss_v2 (AUTOMATIC1111 files a LoRA under SDXL only for "sdxl_…", under SD2
    only with ss_v2 "True"); the user's metadata wins; models lyco cannot place get neither key."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))  # fmt: skip
    cases = {
        "flux1": flux,
        "sd_v1": _unet(cross_attention_dim=768),
        "sd_v2": _unet(cross_attention_dim=1024),
        "sdxl_base_v1-0": _unet(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=8 + 6 * 4),
        None: _unet(cross_attention_dim=16),
    }  # fmt: skip
    for version, unet in cases.items():
        model = lyco.get_model(unet, lyco.LoRAConfig(r=2, target_modules=["to_q"]))  # Flux too: attn.to_q
        path = tmp_path / f"{version}.safetensors"
        lyco.save_lycoris(model, path, style="kohya")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta.get("ss_base_model_version") == version
        assert meta.get("ss_v2") == (None if version is None else str(version == "sd_v2"))
    lyco.save_lycoris(model, tmp_path / "mine.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v1"
