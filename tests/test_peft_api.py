"""PEFT API calls lyco mirrors, checked against peft 0.21 doing the same calls on the same model:
``disable_adapter_layers`` / ``enable_adapter_layers``, ``set_requires_grad``, deleting the active adapter,
``low_cpu_mem_usage`` on loading."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lyco

peft = pytest.importorskip("peft")
X = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


def pair(names=("p", "q", "s")):  # PEFT warns about names inside its "lora_" prefix
    """The same LoRA adapters in lyco and in PEFT (weights copied), the first one active."""
    lyco_model = peft_model = None
    for name in names:
        torch.manual_seed(hash(name) % 1000)
        if lyco_model is None:
            lyco_model = lyco.get_model(base(), lyco.LoRAConfig(r=2, target_modules=["0", "2"], init_weights=False), name)
            peft_model = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False),
                                             adapter_name=name)  # fmt: skip
        else:
            lyco_model.add_adapter(name, lyco.LoRAConfig(r=2, target_modules=["0", "2"], init_weights=False))
            peft_model.add_adapter(name, peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
        for i in ("0", "2"):
            theirs = peft_model.base_model.model[int(i)]
            mine = lyco_model.model[int(i)].lyco_adapters[name]
            with torch.no_grad():
                theirs.lora_A[name].weight.copy_(torch.randn_like(mine.lora_down))
                theirs.lora_B[name].weight.copy_(torch.randn_like(mine.lora_up))
                mine.lora_down.copy_(theirs.lora_A[name].weight)
                mine.lora_up.copy_(theirs.lora_B[name].weight)
    return lyco_model, peft_model


def grads(lyco_model, peft_model) -> tuple[dict, dict]:
    """Per adapter name, whether its weights require grad (all of them the same), in each library."""
    mine = {n: {p.requires_grad for _, layer in lyco_model.adapted_layers() for p in layer.lyco_adapters[n].parameters()}
            for n in lyco_model.peft_config}  # fmt: skip
    theirs = {n: {p.requires_grad for k, p in peft_model.named_parameters() if f".{n}." in k and "lora_" in k}
              for n in peft_model.peft_config}  # fmt: skip
    return mine, theirs


def test_disable_and_enable_adapter_layers_as_peft():
    mine, theirs = pair(("p",))
    with torch.no_grad():
        plain = base()(X)
        adapted = mine(X)
        torch.testing.assert_close(adapted, theirs(X), atol=1e-6, rtol=0)
        mine.disable_adapter_layers()
        theirs.base_model.disable_adapter_layers()
        torch.testing.assert_close(mine(X), plain, atol=0, rtol=0)
        assert grads(mine, theirs)[0] == grads(mine, theirs)[1] == {"p": {False}}
        with mine.disable_adapter():  # the context leaves layers disabled by disable_adapter_layers() disabled
            pass
        torch.testing.assert_close(mine(X), plain, atol=0, rtol=0)
        mine.enable_adapter_layers()
        theirs.base_model.enable_adapter_layers()
        torch.testing.assert_close(mine(X), adapted, atol=0, rtol=0)
        assert grads(mine, theirs)[0] == grads(mine, theirs)[1] == {"p": {True}}


def test_disable_adapter_layers_unmerges_first():
    mine, _ = pair(("p",))
    with torch.no_grad():
        adapted = mine(X)
        mine.merge_adapter()
        with pytest.warns(UserWarning, match="unmerges"):
            mine.disable_adapter_layers()
        torch.testing.assert_close(mine(X), base()(X), atol=1e-5, rtol=1e-5)  # fp32 merge + unmerge rounding
        mine.enable_adapter_layers()
        torch.testing.assert_close(mine(X), adapted, atol=1e-5, rtol=1e-5)
        mine.disable_adapter_layers()
        mine.add_adapter("late", lyco.LoRAConfig(r=2, target_modules=["0"], init_weights=False))
        mine.set_adapter(["p", "late"])  # a layer wrapped while disabled stays disabled
        torch.testing.assert_close(mine(X), base()(X), atol=1e-5, rtol=1e-5)  # the base after merge + unmerge


def test_set_requires_grad_as_peft():
    mine, theirs = pair()
    steps = [(["q"], True), ("p", False), (["p", "s"], True), ("s", False)]
    for names, flag in steps:
        mine.set_requires_grad(names, flag)
        theirs.set_requires_grad(names, flag)
        assert grads(mine, theirs)[0] == grads(mine, theirs)[1], (names, flag)
    mine.set_adapter("q")
    theirs.set_adapter("q")
    assert grads(mine, theirs)[0] == grads(mine, theirs)[1]


@pytest.mark.parametrize(
    ("active", "delete"),
    [(["p"], ["p"]), (["p", "q"], ["p"]), (["q"], ["q", "p"]), (["s"], ["p", "s", "q"])],
    ids=["only-active", "one-of-two", "then-next", "all"],
)
def test_deleting_active_adapters_switches_as_peft(active, delete):
    mine, theirs = pair()
    mine.set_adapter(active)
    theirs.base_model.set_adapter(active)
    for name in delete:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mine.delete_adapter(name)
            theirs.delete_adapter(name)
        assert mine.active_adapters == list(theirs.base_model.active_adapters), name
        with torch.no_grad():
            if mine.active_adapters:
                torch.testing.assert_close(mine(X), theirs(X), atol=1e-6, rtol=0)
    if not mine.peft_config:  # the last one deleted: the base model, no wrapped layers
        assert not list(mine.adapted_layers())
        torch.testing.assert_close(mine(X), base()(X), atol=0, rtol=0)
        with pytest.raises(lyco.AdapterNameError, match="no active adapter"):
            _ = mine.active_adapter


def test_deleting_the_only_active_adapter_warns_naming_the_next():
    mine, _ = pair()
    with pytest.warns(UserWarning, match="now 'q'"):
        mine.delete_adapter("p")
    assert mine.active_adapters == ["q"]


def test_low_cpu_mem_usage_is_accepted_on_loading(tmp_path):
    mine, _ = pair(("p",))
    mine.save_pretrained(tmp_path)
    again = lyco.LycoModel.from_pretrained(base(), tmp_path / "p", low_cpu_mem_usage=True)
    again.load_adapter(tmp_path / "p", "copy", low_cpu_mem_usage=True)
    again.set_adapter("copy")
    with torch.no_grad():
        torch.testing.assert_close(again(X), copy.deepcopy(mine)(X), atol=1e-6, rtol=0)


# -- the functional trio ------------------------------------------------------------------------------------------
def _peft_injected(config):
    model = peft.inject_adapter_in_model(config, base(), adapter_name="p")
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("lora_", "lokr_", "hada_")):
                param.copy_(torch.randn_like(param) * 0.3)  # PEFT's inits zero one factor
    return model


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_functional_trio_both_ways_with_peft(kind):
    from lyco.functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    cfg = {"lora": lambda: peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"]),
           "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["0", "2"]),
           "loha": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["0", "2"])}[kind]  # fmt: skip
    theirs = _peft_injected(cfg())
    state = peft.get_peft_model_state_dict(theirs, adapter_name="p")
    mine = inject_adapter_in_model(cfg(), base(), adapter_name="p", low_cpu_mem_usage=True)  # a PEFT config object
    assert isinstance(mine, nn.Sequential) and "p" in mine.peft_config
    assert set_peft_model_state_dict(mine, state, adapter_name="p") == ([], [])
    with torch.no_grad():
        want = theirs(X)
        assert (want - base()(X)).abs().max() > 1e-3
        torch.testing.assert_close(mine(X), want, atol=1e-5, rtol=1e-5)
    back = get_peft_model_state_dict(mine, adapter_name="p")
    assert set(back) == set(state)
    other = peft.inject_adapter_in_model(cfg(), base(), adapter_name="p")
    peft.set_peft_model_state_dict(other, back, adapter_name="p")
    with torch.no_grad():
        torch.testing.assert_close(other(X), want, atol=1e-5, rtol=1e-5)


def test_inject_from_state_dict_keys_and_strict_loading():
    from lyco.functional import inject_adapter_in_model, set_peft_model_state_dict

    theirs = _peft_injected(peft.LoraConfig(r=2, target_modules=["0", "2"]))
    state = {k: v for k, v in peft.get_peft_model_state_dict(theirs, adapter_name="p").items() if k.startswith("2.")}
    mine = inject_adapter_in_model(lyco.LoRAConfig(r=2, target_modules=["0"]), base(), "p", state_dict=state)
    assert [n for n, m in mine.named_modules() if isinstance(m, lyco.AdaptedLayer)] == ["2"]  # the keys' modules
    before = copy.deepcopy(mine.state_dict())
    with pytest.raises(lyco.FormatError, match="state dict"):
        set_peft_model_state_dict(mine, {**state, "2.lora_A.extra": torch.ones(1)}, adapter_name="p")
    assert all(torch.equal(before[k], v) for k, v in mine.state_dict().items())
    with pytest.raises(lyco.AdapterNameError, match="already has an adapter named 'p'"):
        inject_adapter_in_model(lyco.LoRAConfig(r=2, target_modules=["0"]), mine, "p")


# -- status ----------------------------------------------------------------------------------------------------------
def test_layer_and_model_status_as_peft():
    mine, theirs = pair()
    mine.set_adapter(["p", "q"])
    theirs.base_model.set_adapter(["p", "q"])
    mine.merge_adapter(["s"])
    theirs.base_model.merge_adapter(["s"])
    ours, peft_layers = mine.get_layer_status(), theirs.get_layer_status()
    assert [s.name for s in ours] == [s.name.removeprefix("base_model.") for s in peft_layers] == ["model.0", "model.2"]
    for a, b in zip(ours, peft_layers, strict=True):
        for field in ("enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"):
            assert getattr(a, field) == getattr(b, field), field
    m, p = mine.get_model_status(), theirs.get_model_status()
    for field in ("trainable_params", "num_adapter_layers", "enabled", "active_adapters", "merged_adapters",
                  "requires_grad", "available_adapters", "devices", "base_model_type"):  # fmt: skip
        assert getattr(m, field) == getattr(p, field), field
    assert m.peft_types == p.peft_types == {"p": "LORA", "q": "LORA", "s": "LORA"}
    mine.model[0].disable_adapters = True  # one layer switched off by hand: an inconsistent model
    assert mine.get_model_status().enabled == "irregular"
    with pytest.raises(lyco.StateError, match="no adapter layers"):
        lyco.get_model_status(base())
