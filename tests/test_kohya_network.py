"""sd-scripts contract of ``lyco.kohya`` (``--network_module lyco.kohya``), with ``lycoris.kohya`` (lycoris-lora
4.1.3) as the oracle.

A harness makes the calls sd-scripts' ``train_network.py`` makes, in its order — ``create_network`` (with
``net_kwargs["dropout"]`` and ``neuron_dropout``), ``apply_to``, ``enable_gradient_checkpointing``,
``prepare_optimizer_params``, AdamW, ``prepare_grad_etc``, ``on_epoch_start``, per step ``on_step_start``, forward,
backward, ``clip_grad_norm_(get_trainable_params())``, step, ``apply_max_norm_regularization``, then
``save_weights`` with the ``ss_*`` metadata sd-scripts writes — on a tiny SD-shaped UNet and CLIP text encoder
built from configs. It runs once with each module, for every algorithm (× DoRA, Tucker, scalar); then:

- both files have the same keys, shapes and ``ss_*`` metadata (lyco writes ``ss_network_module`` as
  ``lycoris.kohya``);
- ``lyco.kohya.create_network_from_weights`` + ``apply_to`` on fresh models reproduces the trained outputs of
  lyco's own file and of lycoris-lora's file; ``merge_to`` leaves plain models with the same outputs;
- ``lycoris.kohya.create_network_from_weights`` + ``apply_to`` reproduces lyco's trained outputs from lyco's file.

lycoris-lora 4.1.3 with its default preset ``full`` cannot build a network on a diffusers UNet (its preset
selects ``time_embedding.linear_1`` both through the ``TimestepEmbedding`` class and by name, and its constructor
asserts ``duplicated lora name``), so the comparisons use a preset file without ``TimestepEmbedding``; lyco's first
rule wins, so it builds with ``full`` (:func:`test_default_preset_builds_where_lycoris_asserts`).
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lyco.kohya
from test_integration_diffusers import UNET_IN, tiny_unet

lycoris_kohya = pytest.importorskip("lycoris.kohya")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # fp32 outputs of two implementations (or of a merge) of the same ΔW
MOVED = 1e-4  # training must move the outputs by more than this, or a comparison proves nothing
DIM, ALPHA = 4, 2.0
CONV = {"conv_dim": "2", "conv_alpha": "1"}  # conv rank/alpha ≠ the linear ones
STEPS, LR = 3, 1e-2
MODULES = {"lyco.kohya": lyco.kohya, "lycoris.kohya": lycoris_kohya}

# the ``full`` preset without ``TimestepEmbedding`` (see the module docstring): SD1.5 UNet + CLIP targets
PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}
PRESET_TOML = "\n".join(f"{k} = {json.dumps(v)}" for k, v in PRESET.items()) + "\n"

CP_BUG = (
    "lycoris-lora 4.1.3 cannot reload a LoKr CP (use_tucker) module whose w1 is full (rank read from w2_a)"
)
# (id, network_args as sd-scripts passes them, reason lycoris-lora cannot load such a file — its own too — or None)
CASES = [
    ("lora", {"algo": "lora"}, None),
    ("locon", {"algo": "locon", **CONV}, None),
    ("loha", {"algo": "loha"}, None),
    ("lokr", {"algo": "lokr", "factor": "4"}, None),
    ("full", {"algo": "full"}, None),
    ("lora-dora", {"algo": "lora", "dora_wd": "True"}, None),
    ("loha-dora", {"algo": "loha", "dora_wd": "True"}, None),
    ("lokr-dora", {"algo": "lokr", "factor": "4", "dora_wd": "True"}, None),
    ("locon-tucker", {"algo": "locon", "use_tucker": "True", **CONV}, None),
    ("loha-tucker", {"algo": "loha", "use_tucker": "True", **CONV}, None),
    ("lokr-tucker", {"algo": "lokr", "factor": "4", "use_tucker": "True", **CONV}, CP_BUG),
    ("lora-scalar", {"algo": "lora", "use_scalar": "True"}, None),
    ("loha-scalar", {"algo": "loha", "use_scalar": "True"}, None),
    ("lokr-scalar", {"algo": "lokr", "factor": "4", "use_scalar": "True"}, None),
]
IDS = [c[0] for c in CASES]
MARKERS = {
    "lora": "lora_up.weight",
    "locon": "lora_up.weight",
    "loha": "hada_w2_b",
    "lokr": "lokr_w1",
    "full": "diff",
}
TUCKER = {"locon": "lora_mid.weight", "loha": "hada_t1", "lokr": "lokr_t2"}  # CP cores of the 3×3 convs


def _xfail(bug: str | None) -> list:
    return [pytest.mark.xfail(strict=True, reason=bug)] if bug else []


# -- models ------------------------------------------------------------------------------------------
def tiny_text_encoder(seed: int = 0, projection: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16,
    )  # fmt: skip
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


IDS_IN = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(2))
TARGET = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def forward(text_encoder: nn.Module, unet: nn.Module) -> torch.Tensor:
    """The text encoder's last hidden state as the UNet's ``encoder_hidden_states`` (SD1.5 conditioning)."""
    hidden = text_encoder(IDS_IN).last_hidden_state
    return unet(UNET_IN["sample"], UNET_IN["timestep"], encoder_hidden_states=hidden).sample


def outputs(text_encoder: nn.Module, unet: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return forward(text_encoder, unet)


@pytest.fixture(scope="module")
def bases() -> tuple[nn.Module, nn.Module]:
    """Frozen base models (as sd-scripts freezes them); every use takes a deep copy."""
    te, unet = tiny_text_encoder(), tiny_unet()
    te.requires_grad_(False)
    unet.requires_grad_(False)
    return te, unet


def fresh(bases) -> tuple[nn.Module, nn.Module]:
    return copy.deepcopy(bases[0]), copy.deepcopy(bases[1])


def reset_lycoris() -> None:
    """lycoris-lora keeps its preset as class state that every ``create_network`` changes: set every key."""
    lycoris_kohya.LycorisNetworkKohya.apply_preset(
        {**PRESET, "module_algo_map": {}, "name_algo_map": {}, "exclude_name": [], "use_fnmatch": False}
    )


@pytest.fixture(autouse=True)
def _lycoris_state():
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    reset_lycoris()
    yield
    reset_lycoris()


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("preset") / "sd15.toml"
    path.write_text(PRESET_TOML)
    return str(path)


# -- the sd-scripts harness ----------------------------------------------------------------------------
def sd_scripts_metadata(module_name: str, net_kwargs: dict, steps: int) -> dict[str, str]:
    """A subset of the training metadata sd-scripts' train_network.py writes (all strings)."""
    return {
        "ss_session_id": "123456789", "ss_training_started_at": "1700000000.0", "ss_output_name": "tiny",
        "ss_learning_rate": str(LR), "ss_text_encoder_lr": str(LR), "ss_unet_lr": str(LR),
        "ss_num_train_images": "2", "ss_num_batches_per_epoch": str(steps), "ss_num_epochs": "1",
        "ss_gradient_checkpointing": "True", "ss_max_train_steps": str(steps), "ss_lr_scheduler": "constant",
        "ss_network_module": module_name, "ss_network_dim": str(DIM), "ss_network_alpha": str(ALPHA),
        "ss_network_dropout": "None", "ss_network_args": json.dumps(net_kwargs), "ss_mixed_precision": "no",
        "ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_sd_model_name": "tiny-sd15",
        "ss_scale_weight_norms": "1.0", "ss_max_grad_norm": "1.0", "ss_seed": "42",
        "ss_steps": str(steps), "ss_epoch": "1", "ss_training_finished_at": "1700000100.0",
    }  # fmt: skip


def train(module_name: str, network_args: dict, preset_file: str, path, bases) -> dict:
    """One sd-scripts training run: ``{"out": trained outputs, "base": base outputs, "losses", "path"}``."""
    network_module = MODULES[module_name]
    reset_lycoris()
    te, unet = fresh(bases)
    base_out = outputs(te, unet)
    net_kwargs = {**network_args, "preset": preset_file}
    if "dropout" not in net_kwargs:  # sd-scripts' "workaround for LyCORIS"
        net_kwargs["dropout"] = None
    torch.manual_seed(42)
    network = network_module.create_network(
        1.0, DIM, ALPHA, None, te, unet, neuron_dropout=None, **net_kwargs
    )
    network.apply_to(te, unet, True, True)
    network.enable_gradient_checkpointing()
    params = network.prepare_optimizer_params(LR, LR, LR)
    if isinstance(params, tuple):  # (param groups, lr descriptions) in newer sd-scripts
        params, descriptions = params
        assert len(descriptions) == len(params)
    optimizer = torch.optim.AdamW(params, lr=LR)
    network.prepare_grad_etc(te, unet)
    losses = []
    network.on_epoch_start(te, unet)
    for _ in range(STEPS):
        if hasattr(network, "on_step_start"):
            network.on_step_start(te, unet)
        loss = nn.functional.mse_loss(forward(te, unet), TARGET)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        network.apply_max_norm_regularization(1.0, "cpu")
        losses.append(loss.item())
    out = outputs(te, unet)
    network.save_weights(str(path), torch.float32, sd_scripts_metadata(module_name, net_kwargs, STEPS))
    return {"out": out, "base": base_out, "losses": losses, "path": path}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, preset_file, bases):
    """``trained(module_name, case_id)``: the harness's run, once per module and case."""
    cache: dict[tuple[str, str], dict] = {}
    args = {c[0]: c[1] for c in CASES}

    def get(module_name: str, case: str) -> dict:
        if (module_name, case) not in cache:
            path = tmp_path_factory.mktemp(case) / f"{module_name}.safetensors"
            cache[module_name, case] = train(module_name, args[case], preset_file, path, bases)
        return cache[module_name, case]

    return get


def reload_outputs(module_name: str, path, bases) -> torch.Tensor:
    """sd-scripts' reload (``--network_weights`` with ``--dim_from_weights``, generation): outputs of fresh models."""
    reset_lycoris()
    te, unet = fresh(bases)
    network, _ = MODULES[module_name].create_network_from_weights(1.0, str(path), None, te, unet)
    network.apply_to(te, unet, True, True)
    return outputs(te, unet)


def merged_models(module_name: str, path, bases) -> tuple[nn.Module, nn.Module]:
    """sd-scripts' ``--base_weights`` / merge path: ``is_mergeable`` then ``merge_to``."""
    from safetensors.torch import load_file

    te, unet = fresh(bases)
    weights_sd = load_file(str(path))
    network, weights_sd = MODULES[module_name].create_network_from_weights(
        1.0, str(path), None, te, unet, weights_sd=weights_sd, for_inference=True
    )
    assert network.is_mergeable()
    network.merge_to(te, unet, weights_sd, torch.float32, "cpu")
    return te, unet


def assert_plain(*models: nn.Module) -> None:
    wrapped = [n for m in models for n, _ in m.named_modules() if "base_layer" in n]
    assert not wrapped, wrapped[:4]


def read(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        keys = f.keys()  # a safe_open handle is no dict
        return {k: tuple(f.get_slice(k).get_shape()) for k in keys}, dict(f.metadata() or {})


# -- the contract ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module_name", list(MODULES))
@pytest.mark.parametrize("case", IDS)
def test_harness_trains(trained, module_name, case):
    run = trained(module_name, case)
    assert run["losses"][-1] < run["losses"][0]
    assert (run["out"] - run["base"]).abs().max() > MOVED


@pytest.mark.parametrize("case", IDS)
def test_files_have_lycoris_keys_shapes_and_metadata(trained, case):
    ours, ours_meta = read(trained("lyco.kohya", case)["path"])
    theirs, theirs_meta = read(trained("lycoris.kohya", case)["path"])
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:8]
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}
    assert any(k.startswith("lora_te_") for k in ours) and any(k.startswith("lora_unet_") for k in ours)
    args = dict(c[:2] for c in CASES)[case]
    suffixes = {k.split(".", 1)[1] for k in ours}
    assert MARKERS[args["algo"]] in suffixes
    assert ("dora_scale" in suffixes) == ("dora_wd" in args)
    if "use_tucker" in args:
        assert TUCKER[args["algo"]] in suffixes
    if args["algo"] in ("lora", "locon"):  # linear rank DIM; 3×3 convs conv_dim (DIM when not given)
        assert ours["lora_te_encoder_layers_0_mlp_fc1.lora_down.weight"][0] == DIM
        assert ours["lora_unet_conv_in.lora_down.weight"][0] == int(args.get("conv_dim", DIM))
    assert ours_meta.pop("ss_network_module") == "lycoris.kohya"  # lyco names LyCORIS's module (consumers)
    assert theirs_meta.pop("ss_network_module") == "lycoris.kohya"
    assert "sshs_model_hash" in ours_meta
    ss = {k: v for k, v in ours_meta.items() if k.startswith("ss_")}
    assert ss == {k: v for k, v in theirs_meta.items() if k.startswith("ss_")}
    assert json.loads(ss["ss_network_args"])["algo"] == dict(c[:2] for c in CASES)[case]["algo"]


@pytest.mark.parametrize("trainer", ["lyco.kohya", "lycoris.kohya"], ids=["own-file", "lycoris-file"])
@pytest.mark.parametrize("case", IDS)
def test_lyco_reloads_and_merges_the_file(trained, bases, case, trainer):
    """lyco.kohya reloads (create_network_from_weights + apply_to) and merges its own file and lycoris.kohya's."""
    run = trained(trainer, case)
    torch.testing.assert_close(reload_outputs("lyco.kohya", run["path"], bases), run["out"], atol=ATOL, rtol=0)
    te, unet = merged_models("lyco.kohya", run["path"], bases)
    assert_plain(te, unet)
    torch.testing.assert_close(outputs(te, unet), run["out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("source", list(MODULES))
@pytest.mark.parametrize("case", IDS)
def test_load_weights_into_created_network(trained, bases, preset_file, case, source):
    """sd-scripts' ``--network_weights`` (without ``--dim_from_weights``): ``create_network`` with the same
    ``network_args``, ``apply_to``, ``load_weights`` — lyco's network takes either library's file."""
    run = trained(source, case)
    te, unet = fresh(bases)
    network = build("lyco.kohya", preset_file, te, unet, **dict(c[:2] for c in CASES)[case])
    assert not network.load_weights(str(run["path"]))
    torch.testing.assert_close(outputs(te, unet), run["out"], atol=ATOL, rtol=0)


def test_weights_loaded_before_a_unet_only_apply_to_stay(trained, bases, preset_file):
    """``load_weights`` of a text-encoder + UNet file, then ``apply_to(..., apply_text_encoder=False)``: the UNet
    adapters keep the file's weights (nothing is loaded a second time, so the dropped text-encoder keys are no error)."""
    run = trained("lyco.kohya", "lora")
    te, unet = fresh(bases)
    network = MODULES["lyco.kohya"].create_network(1.0, DIM, ALPHA, None, te, unet, preset=preset_file, **dict(c[:2] for c in CASES)["lora"])
    assert not network.load_weights(str(run["path"]))
    network.apply_to(te, unet, False, True)
    assert not any(k.startswith("lora_te") for k in network.state_dict())
    ref_te, ref_unet = fresh(bases)
    reference = MODULES["lyco.kohya"].create_network_from_weights(1.0, str(run["path"]), None, ref_te, ref_unet)[0]
    reference.apply_to(ref_te, ref_unet, False, True)
    torch.testing.assert_close(outputs(te, unet), outputs(ref_te, ref_unet), atol=ATOL, rtol=0)
    assert (outputs(te, unet) - outputs(*fresh(bases))).abs().max() > MOVED


@pytest.mark.parametrize(
    "case", [pytest.param(c[0], marks=_xfail(c[2])) for c in CASES], ids=IDS
)  # fmt: skip
def test_lycoris_loads_lyco_file(trained, bases, case):
    run = trained("lyco.kohya", case)
    torch.testing.assert_close(
        reload_outputs("lycoris.kohya", run["path"], bases), run["out"], atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    "case", [pytest.param(c[0], marks=_xfail(c[2])) for c in CASES], ids=IDS
)  # fmt: skip
def test_lycoris_reloads_its_file(trained, bases, case):
    """The oracle's own round trip: where it fails, loading lyco's file fails for lycoris-lora's reason."""
    run = trained("lycoris.kohya", case)
    torch.testing.assert_close(
        reload_outputs("lycoris.kohya", run["path"], bases), run["out"], atol=ATOL, rtol=0
    )


# -- lycoris-lora's default-preset bug ---------------------------------------------------------------------
def test_default_preset_builds_where_lycoris_asserts(bases):
    """lycoris-lora 4.1.3's ``full`` preset names ``TimestepEmbedding`` and ``time_embedding.linear_1/2``: its
    kohya constructor asserts ``duplicated lora name`` on any diffusers UNet (its bug). lyco plans each module once."""
    te, unet = fresh(bases)
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_time_embedding_linear_1"):
        lycoris_kohya.create_network(1.0, DIM, ALPHA, None, te, unet, dropout=None)
    te, unet = fresh(bases)
    network = lyco.kohya.create_network(1.0, DIM, ALPHA, None, te, unet, neuron_dropout=None, dropout=None)
    network.apply_to(te, unet, True, True)
    names = [lora.lora_name for lora in network.unet_loras]
    assert len(names) == len(set(names))
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2", "lora_unet_conv_in",
            "lora_unet_conv_out"} <= set(names)  # fmt: skip
    assert network.text_encoder_loras
    with torch.no_grad():
        forward(te, unet)


# -- optimizer groups, LoRA+, partial training ----------------------------------------------------------------
def build(
    module_name: str, preset_file: str, te, unet, apply_te: bool = True, apply_unet: bool = True, **args
):
    reset_lycoris()
    torch.manual_seed(42)
    network = MODULES[module_name].create_network(
        1.0, DIM, ALPHA, None, te, unet, neuron_dropout=None, dropout=None, preset=preset_file, **args
    )
    network.apply_to(te, unet, apply_te, apply_unet)
    return network


def groups_summary(network, lrs: tuple) -> tuple[list[str], list[tuple[float, list[str]]]]:
    """``(descriptions, [(lr, sorted parameter names)])`` of ``prepare_optimizer_params(*lrs)``; names without
    ``.weight`` (lycoris-lora's LoRA factors are ``nn.Linear`` / ``nn.Conv2d`` modules, lyco's parameters)."""
    groups, descriptions = network.prepare_optimizer_params(*lrs)
    names = {id(p): n.removesuffix(".weight") for n, p in network.named_parameters()}
    return list(descriptions), [(g.get("lr"), sorted(names[id(p)] for p in g["params"])) for g in groups]


@pytest.mark.parametrize(
    "lrs", [(1e-4, 2e-4, 1e-3), (None, 2e-4, 1e-3), (1e-4, None, 1e-3)], ids=["both", "te-default", "unet-default"]
)  # fmt: skip
def test_loraplus_groups_match_lycoris(bases, preset_file, lrs):
    summaries = {}
    for name in MODULES:
        te, unet = fresh(bases)
        network = build(name, preset_file, te, unet, algo="lora", loraplus_lr_ratio="4")
        summaries[name] = groups_summary(network, lrs)
    ours, theirs = summaries["lyco.kohya"], summaries["lycoris.kohya"]
    assert ours[0] == theirs[0] == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [(lr, len(n)) for lr, n in ours[1]] == [(lr, len(n)) for lr, n in theirs[1]]
    assert [n for _, n in ours[1]] == [n for _, n in theirs[1]]
    te_lr = lrs[0] if lrs[0] is not None else lrs[2]
    unet_lr = lrs[1] if lrs[1] is not None else lrs[2]
    assert [lr for lr, _ in ours[1]] == pytest.approx([te_lr, te_lr * 4, unet_lr, unet_lr * 4])
    for (_, plain), (_, plus) in (ours[1][:2], ours[1][2:]):
        assert plus and all(n.endswith(".lora_up") for n in plus)
        assert plain and not any(n.endswith(".lora_up") for n in plain)


def test_plain_groups_match_lycoris(bases, preset_file):
    summaries = {}
    for name in MODULES:
        te, unet = fresh(bases)
        summaries[name] = groups_summary(
            build(name, preset_file, te, unet, algo="lokr", factor="4"), (1e-4, 2e-4, 1e-3)
        )
    assert summaries["lyco.kohya"] == summaries["lycoris.kohya"]
    assert summaries["lyco.kohya"][0] == ["textencoder", "unet"]


@pytest.mark.parametrize("ratio", [None, "4"], ids=["plain", "loraplus"])
def test_text_encoder_lr_zero_leaves_it_out(bases, preset_file, ratio):
    summaries = {}
    for name in MODULES:
        te, unet = fresh(bases)
        args = {"algo": "lora"} if ratio is None else {"algo": "lora", "loraplus_lr_ratio": ratio}
        summaries[name] = groups_summary(build(name, preset_file, te, unet, **args), (0, 2e-4, 1e-3))
    ours = summaries["lyco.kohya"]
    assert ours == summaries["lycoris.kohya"]
    assert ours[0] == (["unet"] if ratio is None else ["unet", "unet plus"])
    assert not any(n.startswith("lora_te") for _, names in ours[1] for n in names)


@pytest.mark.parametrize(
    ("apply_te", "apply_unet"), [(False, True), (True, False)], ids=["unet-only", "te-only"]
)
def test_apply_to_keeps_only_trained_parts(bases, preset_file, apply_te, apply_unet):
    keys = {}
    for name in MODULES:
        te, unet = fresh(bases)
        network = build(name, preset_file, te, unet, apply_te, apply_unet, algo="loha")
        keys[name] = set(network.state_dict())
        assert bool(network.text_encoder_loras) == apply_te and bool(network.unet_loras) == apply_unet
        descriptions = network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)[1]
        assert descriptions == (["textencoder"] if apply_te else []) + (["unet"] if apply_unet else [])
        if name == "lyco.kohya":  # the part left out is the base model's own modules
            assert_plain(unet if apply_te else te)
    assert keys["lyco.kohya"] == keys["lycoris.kohya"]
    assert any(k.startswith("lora_te_") for k in keys["lyco.kohya"]) == apply_te
    assert any(k.startswith("lora_unet_") for k in keys["lyco.kohya"]) == apply_unet


def test_two_text_encoders_match_lycoris(bases, preset_file, tmp_path):
    """SDXL-style ``[te1, te2]``: ``lora_te1_`` / ``lora_te2_`` keys as lycoris-lora; its file loads in lyco."""
    unet = bases[1]

    def models():
        return [tiny_text_encoder(0), tiny_text_encoder(1, projection=True)], copy.deepcopy(unet)

    states = {}
    for name in MODULES:
        tes, u = models()
        network = build(name, preset_file, tes, u, algo="lokr", factor="4")
        states[name] = {k: tuple(v.shape) for k, v in network.state_dict().items()}
        if name == "lycoris.kohya":
            torch.manual_seed(7)
            with torch.no_grad():
                for p in network.parameters():
                    p.copy_(torch.randn_like(p) * 0.1)  # its LoKr init zeroes w2
            want = [outputs_te(te) for te in tes]
            network.save_weights(str(tmp_path / "sdxl.safetensors"), torch.float32, None)
    assert states["lyco.kohya"] == states["lycoris.kohya"]
    prefixes = {k.split("_")[1] for k in states["lyco.kohya"]}
    assert prefixes == {"te1", "te2", "unet"}
    tes, u = models()
    base = [outputs_te(te) for te in tes]
    network, _ = lyco.kohya.create_network_from_weights(1.0, str(tmp_path / "sdxl.safetensors"), None, tes, u)
    network.apply_to(tes, u, True, True)
    for te, w, b in zip(tes, want, base, strict=True):
        assert (w - b).abs().max() > MOVED
        torch.testing.assert_close(outputs_te(te), w, atol=ATOL, rtol=0)


def outputs_te(te: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return te(IDS_IN).last_hidden_state


def test_set_multiplier_scales_the_network(trained, bases):
    """``set_multiplier`` (sd-scripts' sampling / ``--network_multiplier``): 0 gives the base model, 1 the trained one."""
    run = trained("lyco.kohya", "lora")
    te, unet = fresh(bases)
    network, _ = lyco.kohya.create_network_from_weights(1.0, str(run["path"]), None, te, unet)
    network.apply_to(te, unet, True, True)
    network.set_multiplier(0.0)
    torch.testing.assert_close(outputs(te, unet), run["base"], atol=ATOL, rtol=0)
    network.set_multiplier(1.0)
    torch.testing.assert_close(outputs(te, unet), run["out"], atol=ATOL, rtol=0)
