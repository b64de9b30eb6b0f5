"""lyco's lycoris-lora API (:mod:`lyco.network`) against lycoris-lora itself: a network built by each library with
the same arguments on copies of the same model has the same modules (state-dict keys, shapes, alphas, scales) and,
once lycoris-lora's random weights are copied into lyco's, the same outputs — for every algorithm and option lyco
has, per-module maps, presets, tiny diffusers transformers (Flux, SD3) and SimpleTuner's ``lycoris_config.json``
examples — plus the network methods trainers call (apply/restore, multiplier, merge, optimizer groups, max-norm,
training, strict loading) and lyco's documented deviations.

lycoris-lora's presets are global class state (and its ``create_lycoris`` re-applies its "full" preset every
call): every test sets each key it relies on, and a fixture resets both libraries' class presets around it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lyco
import lyco.lycoris_config
from lyco.network import LycorisNetwork, create_lycoris, create_lycoris_from_weights
from lycoris_cases import ATOL, MOVED, X, base_root, run

lycoris = pytest.importorskip("lycoris")

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

STD = 0.2  # lycoris-lora's random weights: randn · STD (its LoKr / LoRA init zeroes one factor)
REL = 1e-4  # max-norm statistics: relative tolerance

# lycoris-lora 4.1.3's LycorisNetwork class defaults (what a fresh process has)
ORACLE_DEFAULTS = {
    "enable_conv": True, "target_module": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"],
    "target_name": [], "module_algo_map": {}, "name_algo_map": {}, "lora_prefix": "lycoris", "use_fnmatch": False,
    "exclude_name": [],
}  # fmt: skip
SPLIT_BUG = "lycoris-lora 4.1.3 cannot reload a LoKr whose saved split differs from its factor guess"
WD_BUG = "lycoris-lora 4.1.3 reloads DoRA only on the output axis (make_module_from_state_dict drops wd_on_out)"


def preset(**keys):
    """Every preset key either library reads (tests never inherit another test's preset)."""
    out = {"enable_conv": True, "target_module": ["Net"], "target_name": [], "exclude_name": [],
           "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "lora_prefix": "lycoris"}  # fmt: skip
    out.update(keys)
    return out


@pytest.fixture(autouse=True)
def _fresh_presets():
    """Both libraries' class presets at their defaults before and after every test."""

    def reset():
        lycoris.LycorisNetwork.apply_preset(copy.deepcopy(ORACLE_DEFAULTS))
        LycorisNetwork.preset = lyco.lycoris_config.Preset()

    reset()
    yield
    reset()


# -- helpers ---------------------------------------------------------------------------------------------
def randomize(net: nn.Module, seed: int = 1, std: float = STD) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def oracle(base: nn.Module, keys: dict | None = None, seed: int = 1, std: float = STD, multiplier: float = 1.0, **kwargs):
    """lycoris-lora's network on a deep copy of ``base`` (preset ``keys`` applied first), applied, random weights."""
    model = copy.deepcopy(base)
    if keys is not None:
        lycoris.LycorisNetwork.apply_preset(copy.deepcopy(keys))
    net = lycoris.create_lycoris(model, multiplier, **kwargs)
    net.apply_to()
    randomize(net, seed, std)
    return model, net


def ours(base: nn.Module, keys=None, multiplier: float = 1.0, **kwargs):
    """lyco's network on a deep copy of ``base`` with ``preset=keys``, applied."""
    model = copy.deepcopy(base)
    net = create_lycoris(model, multiplier, preset=copy.deepcopy(keys) if isinstance(keys, dict) else keys, **kwargs)
    net.apply_to()
    return model, net


def shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def alphas(net: nn.Module, consumer_safe: bool = False) -> dict[str, float]:
    """Each module's stored alpha. ``consumer_safe``: a LoKr with both factors full (scale 1 in every reader,
    lycoris-lora stores its dim) as lyco stores it, ``w2`` rows // ``w1`` rows, which a reader dividing alpha by that
    (a newer ComfyUI, reported) also reads as 1."""
    sd = net.state_dict()
    out = {k: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    if consumer_safe:
        for k in out:
            w1, w2 = sd.get(k.replace(".alpha", ".lokr_w1")), sd.get(k.replace(".alpha", ".lokr_w2"))
            if w1 is not None and w2 is not None:
                out[k] = float(max(1, w2.shape[0] // w1.shape[0]))
    return out


def oracle_scales(net) -> dict[str, float]:
    return {m.lora_name: float(getattr(m, "scale", 1.0)) for m in net.loras}  # FullModule: ΔW itself


def our_scales(net) -> dict[str, float]:
    return {a.lora_name: float(a.base_scaling) for a in net.loras}


def same_network(base, forward, keys, **kwargs):
    """Build both networks, check keys / shapes / alphas, copy lycoris-lora's weights into lyco's, check outputs.
    Returns ``((oracle model, oracle net), (lyco model, lyco net), expected output)``."""
    o_model, o_net = oracle(base, keys, **kwargs)
    model, net = ours(base, keys, **kwargs)
    assert shapes(net) == shapes(o_net)
    assert alphas(net) == pytest.approx(alphas(o_net, consumer_safe=True), rel=1e-6)
    net.load_state_dict(o_net.state_dict())
    expected = forward(o_model)
    assert (expected - forward(base)).abs().max() > MOVED
    torch.testing.assert_close(forward(model), expected, atol=ATOL, rtol=0)
    return (o_model, o_net), (model, net), expected


def adapted_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, lyco.AdaptedLayer)]


# -- 1. every algorithm × option ------------------------------------------------------------------------
R2 = {"linear_dim": 2, "linear_alpha": 3, "conv_dim": 2, "conv_alpha": 3}
R1 = {"linear_dim": 1, "linear_alpha": 3, "conv_dim": 1, "conv_alpha": 3}
OPTIONS = {  # option name → (create_lycoris kwargs, the algorithms it applies to)
    "plain": ({**R2}, ("lora", "locon", "loha", "lokr", "full")),
    "tucker": ({**R2, "use_tucker": True}, ("lora", "locon", "loha", "lokr")),
    "scalar": ({**R2, "use_scalar": True}, ("lora", "loha", "lokr")),
    "dora-out": ({**R2, "dora_wd": True}, ("lora", "locon", "loha", "lokr")),
    "dora-in": ({**R2, "dora_wd": True, "wd_on_output": False}, ("lora", "loha", "lokr")),
    "alpha0": ({"linear_dim": 2, "linear_alpha": 0}, ("lora", "loha", "lokr")),  # alpha 0: scale 1
    "conv-dims": ({"linear_dim": 2, "linear_alpha": 1, "conv_dim": 4, "conv_alpha": 8}, ("lora", "loha", "lokr")),
    "factor4": ({**R1, "factor": 4}, ("lokr",)),
    "factor8": ({**R2, "factor": 8}, ("lokr",)),
    "decompose-both": ({**R1, "decompose_both": True}, ("lokr",)),
    "decompose-both-tucker": ({**R1, "decompose_both": True, "use_tucker": True}, ("lokr",)),
    "full-matrix": ({**R2, "full_matrix": True}, ("lokr",)),
    "full-matrix-factor8": ({**R2, "full_matrix": True, "factor": 8}, ("lokr",)),
    "unbalanced": ({**R1, "unbalanced_factorization": True}, ("lokr",)),
    "dim10000": ({"linear_dim": 10000, "linear_alpha": 1}, ("lokr",)),  # SimpleTuner's full LoKr
    "dim10000-factor4-dora": ({"linear_dim": 10000, "linear_alpha": 1, "factor": 4, "dora_wd": True}, ("lokr",)),
}  # fmt: skip
ALGO_CASES = [
    pytest.param(algo, kwargs, id=f"{algo}-{name}") for name, (kwargs, algos) in OPTIONS.items() for algo in algos
]


@pytest.mark.parametrize(("algo", "kwargs"), ALGO_CASES)
def test_same_network_as_lycoris(algo, kwargs):
    (_, o_net), (_, net), _ = same_network(base_root(), run, preset(), algo=algo, **kwargs)
    assert our_scales(net) == pytest.approx(oracle_scales(o_net), rel=1e-6)
    assert [a.lora_name for a in net.loras] == [m.lora_name for m in o_net.loras]


def test_full_matrix_lokr_has_scale_one_whatever_alpha_says():
    _, net = ours(base_root(), preset(), algo="lokr", linear_dim=10000, linear_alpha=1)
    assert set(our_scales(net).values()) == {1.0}  # not alpha / r = 1e-4


# -- 2. files both ways ----------------------------------------------------------------------------------
FILE_CASES = [
    ("lora", {"algo": "lora", **R2}, None),
    ("locon-tucker", {"algo": "locon", "use_tucker": True, **R2}, None),
    ("loha", {"algo": "loha", **R2}, None),
    ("lokr", {"algo": "lokr", **R2}, None),
    ("lokr-dim10000", {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1}, None),
    ("lokr-full-matrix", {"algo": "lokr", "full_matrix": True, **R2}, None),
    ("full", {"algo": "full", **R2}, None),
    ("lora-dora", {"algo": "lora", "dora_wd": True, **R2}, None),
    ("lora-scalar", {"algo": "lora", "use_scalar": True, **R2}, None),
    ("lokr-factor4", {"algo": "lokr", "factor": 4, **R1}, SPLIT_BUG),
    ("loha-dora-in", {"algo": "loha", "dora_wd": True, "wd_on_output": False, **R2}, WD_BUG),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs", "bug"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_lycoris_file_loads_with_create_lycoris_from_weights(tmp_path, name, kwargs, bug):
    base = base_root()
    o_model, o_net = oracle(base, preset(), **kwargs)
    expected = run(o_model)
    assert (expected - run(base)).abs().max() > MOVED
    path = tmp_path / "lycoris.safetensors"
    o_net.save_weights(str(path), torch.float32, None)
    model = copy.deepcopy(base)
    net, weights = create_lycoris_from_weights(1.0, path, model)
    assert set(weights) == set(o_net.state_dict())
    torch.testing.assert_close(run(model), run(base), atol=0, rtol=0)  # not applied yet
    net.apply_to()
    assert shapes(net) == shapes(o_net)
    torch.testing.assert_close(run(model), expected, atol=ATOL, rtol=0)
    # and into a network built with the same arguments, by load_weights
    model2 = copy.deepcopy(base)
    net2 = create_lycoris(model2, 1.0, preset=preset(), **kwargs)
    assert net2.load_weights(path) == {}
    net2.apply_to()
    torch.testing.assert_close(run(model2), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("name", "kwargs", "bug"),
    [pytest.param(*c, marks=[pytest.mark.xfail(strict=True, reason=c[2])] if c[2] else []) for c in FILE_CASES],
    ids=[c[0] for c in FILE_CASES],
)
def test_lyco_file_loads_in_lycoris(tmp_path, name, kwargs, bug):
    base = base_root()
    _, o_net = oracle(base, preset(), **kwargs)
    model, net = ours(base, preset(), **kwargs)
    net.load_state_dict(o_net.state_dict())
    expected = run(model)
    assert (expected - run(base)).abs().max() > MOVED
    path = tmp_path / "lyco.safetensors"
    net.save_weights(path, torch.float32, {"ss_network_module": "lyco.kohya"})
    again = copy.deepcopy(base)
    o_again, _ = lycoris.create_lycoris_from_weights(1.0, str(path), again)
    o_again.apply_to()
    torch.testing.assert_close(run(again), expected, atol=ATOL, rtol=0)
    # lyco reads its own file back the same way
    mine = copy.deepcopy(base)
    net3, _ = create_lycoris_from_weights(1.0, path, mine)
    net3.apply_to()
    torch.testing.assert_close(run(mine), expected, atol=ATOL, rtol=0)


def test_save_weights_metadata_and_dtype(tmp_path):
    from safetensors import safe_open

    _, net = ours(base_root(), preset(), algo="lora", **R2)
    path = tmp_path / "n.safetensors"
    net.save_weights(path, torch.float16, {"ss_network_module": "lyco.kohya", "note": "x"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(net.state_dict())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())  # noqa: SIM118 (safe_open is no dict)
    assert meta["note"] == "x" and meta["ss_network_module"] == "lycoris.kohya"
    assert meta["sshs_model_hash"].startswith("0x")
    with pytest.raises(lyco.FormatError, match="safetensors"):
        net.save_weights(tmp_path / "n.pt")


# -- 3. per-module maps ------------------------------------------------------------------------------------
FULL_LOKR = {
    "full_matrix": {"algo": "lokr", "full_matrix": True},
    "dim10000": {"algo": "lokr", "dim": 10000},
}
MAP_CASES = {
    # regex name_algo_map: LoKr full-matrix on the Linear, LoRA and LoCon (dim / alpha of their own) on the convs
    "name-regex": lambda full: preset(target_module=[], name_algo_map={
        r"net\.fc": full, r"net\.(small|conv)$": {"algo": "locon", "dim": 3, "alpha": 6},
        r"net\.(pw|conv1d)": {"algo": "lora"}}),
    # name map on top of target_name patterns; a target_name module without an entry takes the default algo
    "target-name+map": lambda full: preset(target_module=[], target_name=[r"net\.(small|pw)"],
                                           name_algo_map={"net.fc": full, r"net\.conv1": {"algo": "loha"}}),
    # per class: nested classes inside Net take their class's entry; exclude_name keeps net.pw out
    "module-map+exclude": lambda full: preset(module_algo_map={"Linear": full, "Conv1d": {"algo": "loha", "dim": 3,
                                              "alpha": 1.5}, "Conv2d": {"algo": "lora", "use_tucker": True}},
                                              exclude_name=["net.pw"]),
    # module map classes are targets by themselves too (no target_module)
    "module-map-only": lambda full: preset(target_module=[], module_algo_map={"Linear": full, "Conv2d": {}}),
    # exclude by regex pattern
    "exclude-regex": lambda full: preset(exclude_name=[r"net\.conv.*"], module_algo_map={"Linear": full}),
    # fnmatch patterns for target_name, name_algo_map and exclude_name
    "fnmatch": lambda full: preset(target_module=[], target_name=["net.c*", "*.small"], exclude_name=["*1d"],
                                   name_algo_map={"*.fc": full, "net.s*": {"algo": "loha"}}, use_fnmatch=True),
}  # fmt: skip


@pytest.mark.parametrize("full", list(FULL_LOKR))
@pytest.mark.parametrize("case", list(MAP_CASES))
def test_maps_give_the_same_modules_and_outputs(case, full):
    keys = MAP_CASES[case](FULL_LOKR[full])
    (_, o_net), (_, net), _ = same_network(base_root(), run, keys, algo="lora", **R2)
    assert our_scales(net) == pytest.approx(oracle_scales(o_net), rel=1e-6)
    names = {m.lora_name: type(m).__name__ for m in o_net.loras}
    assert names["lycoris_net_fc"] == "LokrModule" and our_scales(net)["lycoris_net_fc"] == 1.0  # full LoKr: scale 1


def test_map_cases_cover_what_they_claim():
    """The map cases above are not vacuous: the module sets and algorithms they produce, from lycoris-lora."""
    want = {
        "name-regex": {"net_fc": "LokrModule", "net_small": "LoConModule", "net_conv": "LoConModule",
                       "net_pw": "LoConModule", "net_conv1d": "LoConModule"},
        "target-name+map": {"net_small": "LoConModule", "net_pw": "LoConModule", "net_fc": "LokrModule",
                            "net_conv1d": "LohaModule"},
        "module-map+exclude": {"net_small": "LoConModule", "net_conv": "LoConModule", "net_conv1d": "LohaModule",
                               "net_fc": "LokrModule"},
        "module-map-only": {"net_small": "LoConModule", "net_conv": "LoConModule", "net_pw": "LoConModule",
                            "net_fc": "LokrModule"},
        "exclude-regex": {"net_small": "LoConModule", "net_pw": "LoConModule", "net_fc": "LokrModule"},
        "fnmatch": {"net_conv": "LoConModule", "net_small": "LohaModule", "net_fc": "LokrModule"},
    }  # fmt: skip
    for case, build in MAP_CASES.items():
        _, o_net = oracle(base_root(), build(FULL_LOKR["full_matrix"]), algo="lora", **R2)
        got = {m.lora_name.removeprefix("lycoris_"): type(m).__name__ for m in o_net.loras}
        assert got == want[case], case
        _, net = ours(base_root(), build(FULL_LOKR["full_matrix"]), algo="lora", **R2)
        assert {a.lora_name.removeprefix("lycoris_") for a in net.loras} == set(want[case]), case


# -- 4. a tiny Flux transformer, per-class factors ---------------------------------------------------------
def tiny_flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


_g = torch.Generator().manual_seed(2)
_ROWS, _COLS, _TXT = 2, 3, 3
FLUX_IN = {
    "hidden_states": torch.randn(2, _ROWS * _COLS, 4, generator=_g),
    "encoder_hidden_states": torch.randn(2, _TXT, 16, generator=_g),
    "pooled_projections": torch.randn(2, 8, generator=_g),
    "timestep": torch.tensor([0.1, 0.7]),
    "img_ids": torch.stack([torch.zeros(_ROWS, _COLS), *torch.meshgrid(torch.arange(_ROWS.__float__()),
                            torch.arange(_COLS.__float__()), indexing="ij")], -1).reshape(-1, 3),
    "txt_ids": torch.zeros(_TXT, 3),
}  # fmt: skip
SD3_IN = {
    "hidden_states": torch.randn(2, 4, 8, 8, generator=_g), "timestep": torch.tensor([10, 500]),
    "encoder_hidden_states": torch.randn(2, 5, 16, generator=_g), "pooled_projections": torch.randn(2, 8, generator=_g),
}  # fmt: skip


def run_flux(model):
    with torch.no_grad():
        return model(**FLUX_IN).sample


def run_sd3(model):
    with torch.no_grad():
        return model(**SD3_IN).sample


FLUX_BLOCKS = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]


@pytest.mark.parametrize(
    ("kwargs", "maps"),
    [
        ({"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1},
         {"FluxTransformerBlock": {"factor": 4}, "FluxSingleTransformerBlock": {"factor": 8}}),
        ({"algo": "lokr", "linear_dim": 4, "linear_alpha": 2, "factor": 4},
         {"FluxTransformerBlock": {"factor": 2}, "FluxSingleTransformerBlock": {"algo": "loha", "dim": 2}}),
    ],
    ids=["lokr-full-factor4-8", "lokr-lowrank+loha"],
)  # fmt: skip
def test_flux_blocks_with_per_class_factors(kwargs, maps):
    base = tiny_flux()
    keys = preset(target_module=FLUX_BLOCKS, module_algo_map=maps)
    (_, o_net), (model, net), _ = same_network(base, run_flux, keys, **kwargs)
    assert our_scales(net) == pytest.approx(oracle_scales(o_net), rel=1e-6)
    paths = adapted_paths(model)
    assert any(p.startswith("transformer_blocks.0.") for p in paths)
    assert any(p.startswith("single_transformer_blocks.0.") for p in paths)
    assert not any(p.startswith(("x_embedder", "context_embedder", "proj_out", "time_text_embed")) for p in paths)
    if kwargs["linear_dim"] == 10000:  # the two classes got different splits: the factor reached each
        w1 = {k: v for k, v in shapes(net).items() if k.endswith("lokr_w1")}
        double = {v for k, v in w1.items() if "single" not in k}
        single = {v for k, v in w1.items() if "single" in k}
        assert double and single and double != single
        assert set(our_scales(net).values()) == {1.0}


# -- 5. SimpleTuner's lycoris_config.json examples ---------------------------------------------------------
def tiny_sd3():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
    ).eval()  # fmt: skip


ST_PRESET = {"target_module": ["Attention", "FeedForward"],
             "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}  # fmt: skip
SIMPLETUNER = {
    "lokr": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
             "apply_preset": ST_PRESET},
    "lokr-full-bypass": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
                         "full_matrix": True, "bypass_mode": True,
                         "apply_preset": {"target_module": ["Attention", "FeedForward"],
                                          "module_algo_map": {"Attention": {"factor": 4}, "FeedForward": {"factor": 4}}}},
    "lokr-full-bypass-16-8": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
                              "full_matrix": True, "bypass_mode": True, "apply_preset": ST_PRESET},
    "loha": {"algo": "loha", "multiplier": 1.0, "linear_dim": 32, "linear_alpha": 16,
             "apply_preset": {"target_module": ["Attention", "FeedForward"]}},
    "lora": {"algo": "lora", "multiplier": 1.0, "linear_dim": 64, "linear_alpha": 32,
             "apply_preset": {"target_module": ["Attention", "FeedForward"]}},
    "lokr-dora": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
                  "dora_wd": True, "apply_preset": ST_PRESET},
    "lora-dora": {"algo": "lora", "multiplier": 1.0, "linear_dim": 64, "linear_alpha": 32, "dora_wd": True,
                  "apply_preset": {"target_module": ["Attention", "FeedForward"]}},
}  # fmt: skip
ST_SCALES = {"lokr": 1.0, "lokr-full-bypass": 1.0, "lokr-full-bypass-16-8": 1.0, "loha": 0.5, "lora": 0.5, "lokr-dora": 1.0, "lora-dora": 0.5}


def simpletuner_wrap(path: Path, model: nn.Module, network_class, create):
    """SimpleTuner's loader: json, pop the positional keys, ``apply_preset`` on the class, then ``create_lycoris``
    with every other key (``apply_preset`` included)."""
    config = json.loads(path.read_text())
    multiplier = int(config["multiplier"])
    linear_dim = int(config["linear_dim"])
    linear_alpha = int(config["linear_alpha"])
    apply_preset = config["apply_preset"]
    if apply_preset is not None and apply_preset != {}:
        network_class.apply_preset(apply_preset)
    del config["multiplier"], config["linear_dim"], config["linear_alpha"]
    return create(model, multiplier, linear_dim, linear_alpha, **config)


@pytest.mark.parametrize("name", list(SIMPLETUNER))
def test_simpletuner_configs(tmp_path, name):
    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps(SIMPLETUNER[name]))
    base = tiny_sd3()
    base.requires_grad_(False)  # SimpleTuner freezes the transformer first
    o_model = copy.deepcopy(base)
    o_net = simpletuner_wrap(path, o_model, lycoris.LycorisNetwork, lycoris.create_lycoris)
    o_net.apply_to()
    randomize(o_net)
    model = copy.deepcopy(base)
    net = simpletuner_wrap(path, model, LycorisNetwork, create_lycoris)
    net.apply_to()
    assert shapes(net) == shapes(o_net)
    assert alphas(net) == pytest.approx(alphas(o_net, consumer_safe=True), rel=1e-6)
    assert our_scales(net) == pytest.approx(oracle_scales(o_net), rel=1e-6)
    assert set(our_scales(net).values()) == {ST_SCALES[name]}  # full LoKr: 1, not alpha / r = 1e-4
    paths = adapted_paths(model)
    assert paths and all(re.search(r"\.(attn|ff|ff_context)\.", p) for p in paths)
    assert any(".ff." in p for p in paths) and any(p.endswith("add_q_proj") for p in paths)
    net.load_state_dict(o_net.state_dict())
    expected = run_sd3(o_model)
    assert (expected - run_sd3(base)).abs().max() > MOVED
    torch.testing.assert_close(run_sd3(model), expected, atol=ATOL, rtol=0)
    # the network's parameters are the trainable ones; the frozen transformer stays frozen
    assert all(p.requires_grad for p in net.parameters())
    assert not any(p.requires_grad for p in base.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lyco_adapters" not in n)


def test_simpletuner_lokr_factors_reach_each_class(tmp_path):
    """Attention layers (16→16) split by factor 16, FeedForward (16→64, 64→16) by 8: w1 shapes differ by class."""
    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps(SIMPLETUNER["lokr"]))
    net = simpletuner_wrap(path, tiny_sd3(), LycorisNetwork, create_lycoris)
    w1 = {k: v for k, v in shapes(net).items() if k.endswith("lokr_w1")}
    attn = {v for k, v in w1.items() if "_attn_" in k}
    ff = {v for k, v in w1.items() if "_ff_" in k or "_ff_context_" in k}
    assert attn and ff and attn.isdisjoint(ff)


# -- 6. presets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-convblock-only"])
def test_builtin_presets_by_name(name):
    base = base_root()
    o_model, o_net = oracle(base, None, algo="lora", preset=name, **R2)
    model, net = ours(base, name, algo="lora", **R2)
    assert shapes(net) == shapes(o_net)
    net.load_state_dict(o_net.state_dict())
    torch.testing.assert_close(run(model), run(o_model), atol=ATOL, rtol=0)
    convs = {"lycoris_net_small.lora_down.weight", "lycoris_net_conv.lora_down.weight"}  # the 3×3 convs
    if name in ("full", "unet-only", "unet-convblock-only"):  # enable_conv
        assert convs <= set(shapes(net))
    else:
        assert not convs & set(shapes(net)) and "lycoris_net_pw.lora_down.weight" in shapes(net)


TOML = """
enable_conv = true
target_module = []
target_name = ['net\\.(small|conv)$']
exclude_name = ["net.conv"]

[module_algo_map.Linear]
algo = "lokr"
full_matrix = true

[name_algo_map."net.pw"]
algo = "loha"
dim = 3
alpha = 1.5
"""
TOML_DICT = {"enable_conv": True, "target_module": [], "target_name": [r"net\.(small|conv)$"], "exclude_name": ["net.conv"],
             "module_algo_map": {"Linear": {"algo": "lokr", "full_matrix": True}},
             "name_algo_map": {"net.pw": {"algo": "loha", "dim": 3, "alpha": 1.5}}}  # fmt: skip


def test_toml_preset_file(tmp_path):
    path = tmp_path / "preset.toml"
    path.write_text(TOML)
    base = base_root()
    keys = {**preset(), **TOML_DICT}
    o_model, o_net = oracle(base, keys, algo="lora", **R2)
    # lyco given the file, on top of the class defaults (the file sets every key the comparison depends on)
    model = copy.deepcopy(base)
    net = create_lycoris(model, 1.0, algo="lora", preset=path, **R2)
    net.apply_to()
    assert shapes(net) == shapes(o_net)
    assert {m.lora_name: type(m).__name__ for m in o_net.loras} == {
        "lycoris_net_small": "LoConModule", "lycoris_net_pw": "LohaModule", "lycoris_net_fc": "LokrModule"}
    net.load_state_dict(o_net.state_dict())
    torch.testing.assert_close(run(model), run(o_model), atol=ATOL, rtol=0)
    # lycoris-lora reading the same file itself agrees
    lycoris.LycorisNetwork.apply_preset(copy.deepcopy(ORACLE_DEFAULTS))
    _, o_net2 = oracle(base, None, algo="lora", preset=str(path), **R2)
    assert shapes(o_net2) == shapes(o_net)
    # and lyco's class preset from the file gives the same
    LycorisNetwork.apply_preset(path)
    _, net3 = ours(base, None, algo="lora", **R2)
    assert shapes(net3) == shapes(o_net)


def test_json_preset_file(tmp_path):
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(TOML_DICT))
    _, o_net = oracle(base_root(), {**preset(), **TOML_DICT}, algo="lora", **R2)
    _, net = ours(base_root(), str(path), algo="lora", **R2)
    assert shapes(net) == shapes(o_net)


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ({"target_modules": ["Net"]}, "target_modules"),
        ({"target_module": "Net", "bogus_key": 1}, "bogus_key"),
        ("no-such-preset", "no-such-preset"),
        ({"target_module": [1, 2]}, "target_module"),
        ({"module_algo_map": {"Linear": "lokr"}}, "module_algo_map"),
    ],
    ids=["typo", "unknown", "unknown-name", "not-strings", "map-not-dict"],
)  # fmt: skip
def test_bad_presets_are_config_errors(bad, pattern):
    base = base_root()
    with pytest.raises(lyco.ConfigError, match=re.escape(pattern)):
        create_lycoris(copy.deepcopy(base), 1.0, preset=bad)
    if isinstance(bad, dict):
        with pytest.raises(lyco.ConfigError, match=re.escape(pattern)):
            LycorisNetwork.apply_preset(bad)
    assert LycorisNetwork.preset == lyco.lycoris_config.Preset()


def test_unknown_key_in_preset_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('target_module = ["Net"]\ntarget_modulez = ["Linear"]\n')
    with pytest.raises(lyco.ConfigError, match="target_modulez"):
        create_lycoris(base_root(), 1.0, preset=path)


def test_preset_is_per_network_but_class_preset_is_the_default():
    base = base_root()
    _, a = ours(base, preset(target_module=["Linear"]), algo="lora", **R2)
    LycorisNetwork.apply_preset(preset(target_module=["Conv1d"]))
    _, b = ours(base, None, algo="lora", **R2)
    assert {x.lora_name for x in a.loras} == {"lycoris_net_fc"}  # built before: keeps its preset
    assert {x.lora_name for x in b.loras} == {"lycoris_net_conv1d"}
    assert a.network_preset.target_module == ("Linear",)


# -- 7. network behaviour --------------------------------------------------------------------------------
def test_apply_to_and_restore_leave_the_model_as_it_was():
    base = base_root()
    model = copy.deepcopy(base)
    before_out, before_keys = run(model), list(model.state_dict())
    modules = {n: m for n, m in model.named_modules()}
    net = create_lycoris(model, 1.0, preset=preset(), algo="lokr", **R2)
    assert {n: m for n, m in model.named_modules()} == modules  # not applied by create_lycoris
    randomize(net)
    net.apply_to()
    assert adapted_paths(model) == ["net.small", "net.conv", "net.pw", "net.conv1d", "net.fc"]
    assert (run(model) - before_out).abs().max() > MOVED
    net.restore()
    assert {n: m for n, m in model.named_modules()} == modules
    assert list(model.state_dict()) == before_keys
    torch.testing.assert_close(run(model), before_out, atol=0, rtol=0)
    net.apply_to()  # and again
    assert (run(model) - before_out).abs().max() > MOVED
    net.restore()
    torch.testing.assert_close(run(model), before_out, atol=0, rtol=0)


def test_parameters_are_only_the_adapters():
    base = base_root()
    model = copy.deepcopy(base)
    base_ids = {id(p) for p in model.parameters()}
    net = create_lycoris(model, 1.0, preset=preset(), algo="lora", dora_wd=True, **R2)
    net.apply_to()
    params = list(net.parameters())
    assert params and base_ids.isdisjoint(id(p) for p in params)
    assert {id(p) for p in model.parameters()} >= base_ids  # the model still holds its own, and the adapters'
    assert all(n.startswith("lycoris_") for n, _ in net.named_parameters())
    _, o_net = oracle(base, preset(), algo="lora", dora_wd=True, **R2)
    assert sorted(tuple(p.shape) for p in params) == sorted(tuple(p.shape) for p in o_net.parameters())


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "full"])
def test_set_multiplier_matches_lycoris(algo):
    base = base_root()
    (o_model, o_net), (model, net), full = same_network(base, run, preset(), algo=algo, **R2)
    o_net.set_multiplier(0.5)
    net.set_multiplier(0.5)
    expected = run(o_model)
    assert (expected - full).abs().max() > MOVED
    torch.testing.assert_close(run(model), expected, atol=ATOL, rtol=0)
    net.set_multiplier(0.0)
    torch.testing.assert_close(run(model), run(base), atol=ATOL, rtol=0)


def test_multiplier_given_at_creation():
    base = base_root()
    o_model, o_net = oracle(base, preset(), multiplier=0.25, algo="loha", **R2)
    model, net = ours(base, preset(), multiplier=0.25, algo="loha", **R2)
    net.load_state_dict(o_net.state_dict())
    torch.testing.assert_close(run(model), run(o_model), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("algo", "dora"), [(a, d) for a in ("lora", "loha", "lokr", "full") for d in (False, True)
                                             if not (d and a == "full")])  # fmt: skip  # Full has no DoRA
def test_merge_to_gives_the_applied_outputs_without_wrappers(algo, dora):
    base = base_root()
    extra = {"dora_wd": True} if dora else {}
    _, (model, net), expected = same_network(base, run, preset(), algo=algo, **R2, **extra)
    net.merge_to(1.0)
    assert adapted_paths(model) == []
    assert list(model.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(run(model), expected, atol=ATOL, rtol=0)
    with pytest.raises(lyco.StateError):
        net.apply_to()


def test_prepare_optimizer_params():
    base = base_root()
    (_, o_net), (_, net), _ = same_network(base, run, preset(), algo="lora", **R2)
    net.requires_grad_(False)
    groups = net.prepare_optimizer_params(1e-3)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    params = groups[0]["params"]
    assert {id(p) for p in params} == {id(p) for p in net.parameters()} and len(params) == len(set(map(id, params)))
    assert all(p.requires_grad for p in params)
    o_groups = o_net.prepare_optimizer_params(1e-3)
    assert len(params) == len(o_groups[0]["params"])
    assert {id(p) for p in base.parameters()}.isdisjoint(id(p) for p in params)
    assert "lr" not in net.prepare_optimizer_params(None)[0]


@pytest.mark.parametrize("max_norm", [1.0, 3.0])
def test_apply_max_norm_regularization_matches_lycoris(max_norm):
    base = base_root()
    o_model, o_net = oracle(base, preset(), algo="lora", **R2)  # ‖ΔW‖ 1.1 … 6.5: 1.0 scales all, 3.0 three of five
    model, net = ours(base, preset(), algo="lora", **R2)
    net.load_state_dict(o_net.state_dict())
    torch.testing.assert_close(run(model), run(o_model), atol=ATOL, rtol=0)
    o_scaled, o_mean, o_max = o_net.apply_max_norm_regularization(max_norm, "cpu")
    scaled, mean, maximum = net.apply_max_norm_regularization(max_norm, "cpu")
    assert int(o_scaled) == {1.0: 5, 3.0: 3}[max_norm]
    assert int(scaled) == int(o_scaled)
    assert mean == pytest.approx(float(o_mean), rel=REL)
    assert maximum == pytest.approx(float(o_max), rel=REL)
    torch.testing.assert_close(run(model), run(o_model), atol=ATOL, rtol=0)
    # the saved weights carry the new norms: lycoris-lora's state dict (scalar folded in) loads into lyco
    model2, net2 = ours(base, preset(), algo="lora", **R2)
    net2.load_state_dict(o_net.state_dict())
    torch.testing.assert_close(run(model2), run(o_model), atol=ATOL, rtol=0)


def test_apply_max_norm_below_the_limit_changes_nothing():
    base = base_root()
    model, net = ours(base, preset(), algo="lora", **R2)
    randomize(net, std=1e-3)
    before = run(model)
    assert net.apply_max_norm_regularization(1e6, None) == (0, 0.0, 0.0)
    torch.testing.assert_close(run(model), before, atol=0, rtol=0)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_training_steps_match_lycoris_and_touch_only_adapters(algo):
    base = base_root()
    base.requires_grad_(False)  # trainers freeze the model; LyCORIS leaves that to them
    (o_model, o_net), (model, net), _ = same_network(base, run, preset(), algo=algo, **R2)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    target = torch.randn(2, 48, generator=torch.Generator().manual_seed(7))
    losses = {}
    for key, (m, n) in {"oracle": (o_model, o_net), "lyco": (model, net)}.items():
        opt = torch.optim.SGD(n.prepare_optimizer_params(0.05), lr=0.05)
        history = []
        for _ in range(3):
            loss = nn.functional.mse_loss(m(X), target)
            opt.zero_grad()
            loss.backward()
            if key == "lyco":
                assert all(p.grad is not None for p in n.parameters())
                assert all(p.grad is None for nm, p in m.named_parameters() if "lyco_adapters" not in nm)
            opt.step()
            history.append(loss.item())
        losses[key] = history
    assert losses["lyco"][-1] < losses["lyco"][0]
    assert losses["lyco"] == pytest.approx(losses["oracle"], rel=1e-4)
    torch.testing.assert_close(run(model), run(o_model), atol=ATOL, rtol=0)
    net.restore()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, frozen[k], atol=0, rtol=0, msg=k)


def test_fresh_network_is_the_identity_and_trains():
    """lyco's own init (no copied weights): outputs unchanged at first, a few SGD steps lower the loss."""
    base = base_root()
    model, net = ours(base, preset(), algo="lokr", linear_dim=10000, linear_alpha=1)
    torch.testing.assert_close(run(model), run(base), atol=ATOL, rtol=0)
    opt = torch.optim.SGD(net.prepare_optimizer_params(0.1))
    target = torch.randn(2, 48, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(3):
        loss = nn.functional.mse_loss(model(X), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _assert_unchanged(net, before):
    after = net.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
def test_load_state_dict_is_all_or_nothing(applied):
    base = base_root()
    _, o_net = oracle(base, preset(), algo="lora", **R2)
    model = copy.deepcopy(base)
    net = create_lycoris(model, 1.0, preset=preset(), algo="lora", **R2)
    randomize(net, seed=5)
    if applied:
        net.apply_to()
    before = _snapshot(net)
    good = o_net.state_dict()
    missing = {k: v for k, v in good.items() if k != "lycoris_net_fc.lora_up.weight"}
    with pytest.raises(lyco.FormatError, match=r"net[._]fc"):
        net.load_state_dict(missing)
    _assert_unchanged(net, before)
    wrong = dict(good, **{"lycoris_net_fc.lora_up.weight": torch.zeros(48, 3)})
    with pytest.raises(lyco.ShapeMismatchError, match=r"net[._]fc"):
        net.load_state_dict(wrong)
    _assert_unchanged(net, before)
    extra = dict(good, **{"lycoris_net_nothere.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(lyco.FormatError):
        net.load_state_dict(extra)
    _assert_unchanged(net, before)
    other_alpha = dict(good, **{"lycoris_net_fc.alpha": torch.tensor(7.0)})
    with pytest.raises(lyco.FormatError, match="alpha"):
        net.load_state_dict(other_alpha)
    _assert_unchanged(net, before)
    assert bool(adapted_paths(model)) == applied  # a failed load leaves the wrappers as they were
    info = net.load_state_dict(good)
    assert list(info.missing_keys) == [] and list(info.unexpected_keys) == []


@pytest.mark.parametrize("algo", ["diag-oft", "boft", "ia3", "glora", "tlora", "dylora", "nonsense"])
def test_algos_lyco_lacks_are_config_errors_naming_them(algo):
    base = base_root()
    model = copy.deepcopy(base)
    with pytest.raises(lyco.ConfigError, match=re.escape(repr(algo))):
        create_lycoris(model, 1.0, preset=preset(), algo=algo, **R2)
    with pytest.raises(lyco.ConfigError, match=re.escape(repr(algo))):
        create_lycoris(model, 1.0, preset=preset(target_module=[], name_algo_map={"net.fc": {"algo": algo}}), algo="lora", **R2)
    with pytest.raises(lyco.ConfigError, match=re.escape(repr(algo))):
        create_lycoris(model, 1.0, preset=preset(module_algo_map={"Linear": {"algo": algo}}), algo="lora", **R2)
    assert adapted_paths(model) == []
    torch.testing.assert_close(run(model), run(base), atol=0, rtol=0)


def test_train_norm_is_a_config_error():
    with pytest.raises(lyco.ConfigError, match="train_norm"):
        create_lycoris(base_root(), 1.0, preset=preset(), algo="lora", train_norm=True)


# -- documented deviations ---------------------------------------------------------------------------------
def test_rs_lora_is_honoured():
    """lycoris-lora's create_lycoris drops rs_lora (its modules would take it); lyco's scales by alpha / √r,
    like lycoris-lora's LycorisNetwork given rs_lora directly."""
    base = base_root()
    kwargs = {"linear_dim": 4, "linear_alpha": 2, "conv_dim": 4, "conv_alpha": 2}
    _, o_net_ignored = oracle(base, preset(), algo="lora", rs_lora=True, **kwargs)
    assert set(oracle_scales(o_net_ignored).values()) == {0.5}  # alpha / r: rs_lora ignored
    lycoris.LycorisNetwork.apply_preset(preset())
    o_model = copy.deepcopy(base)
    o_net = lycoris.LycorisNetwork(o_model, 1.0, lora_dim=4, conv_lora_dim=4, alpha=2, conv_alpha=2,
                                   network_module="lora", rs_lora=True)  # fmt: skip
    o_net.apply_to()
    randomize(o_net)
    model, net = ours(base, preset(), algo="lora", rs_lora=True, **kwargs)
    assert set(our_scales(net).values()) == {2 / math.sqrt(4)}
    assert our_scales(net) == pytest.approx(oracle_scales(o_net))
    assert shapes(net) == shapes(o_net)
    net.load_state_dict(o_net.state_dict())
    torch.testing.assert_close(run(model), run(o_model), atol=ATOL, rtol=0)


def test_top_level_weight_decompose_means_dora_wd():
    base = base_root()
    _, o_ignored = oracle(base, preset(), algo="lora", weight_decompose=True, **R2)
    assert not any(k.endswith("dora_scale") for k in o_ignored.state_dict())  # lycoris-lora reads only dora_wd
    o_model, o_net = oracle(base, preset(), algo="lora", dora_wd=True, **R2)
    model, net = ours(base, preset(), algo="lora", weight_decompose=True, **R2)
    assert shapes(net) == shapes(o_net) and any(k.endswith("dora_scale") for k in shapes(net))
    net.load_state_dict(o_net.state_dict())
    torch.testing.assert_close(run(model), run(o_model), atol=ATOL, rtol=0)


class WithConv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(self.conv3d(x).mean((2, 3, 4)))


def test_conv3d_is_skipped_with_a_warning():
    torch.manual_seed(0)
    base = WithConv3d()
    keys = preset(target_module=["Linear", "Conv3d"])
    _, o_net = oracle(base, keys, algo="lora", **R2)
    assert {m.lora_name for m in o_net.loras} == {"lycoris_conv3d", "lycoris_fc"}
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="Conv3d"):
        net = create_lycoris(model, 1.0, preset=keys, algo="lora", **R2)
    assert {a.lora_name for a in net.loras} == {"lycoris_fc"}
    assert shapes(net) == {k: v for k, v in shapes(o_net).items() if k.startswith("lycoris_fc.")}
    net.apply_to()
    x = torch.randn(1, 2, 3, 3, 3)
    with torch.no_grad():
        model(x)
