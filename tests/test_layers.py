"""The adapter table: method × layer kind × option.

For every case: forward == base + delta applied the base layer's way; the dense delta equals the
naive seed formula computed here; merge == unmerged forward and unmerge restores the weight;
zero init is the identity; only adapter parameters get gradients; fp16/bf16 forward keeps the dtype.
Dropouts, several adapters, scaling and safe merge are in ``test_layers_behaviour.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lyco
from conftest import CONV_KINDS, LAYER_KINDS, adapt, make_input, reference_apply

ATOL = RTOL = 1e-5  # fp32: forward vs reference, delta vs naive formula, merged vs unmerged
MOVED = 100 * ATOL  # minimal output change a random adapter must cause
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}  # half forward vs fp32 reference (atol = rtol)

HADA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
LOKR_W2_LOW = {"lokr_w2_a", "lokr_w2_b"}
ALL_KINDS = tuple(LAYER_KINDS)
METHODS = {"lora": lyco.LoRAConfig, "loha": lyco.LoHaConfig, "lokr": lyco.LoKrConfig, "full": lyco.FullConfig}
LORA = {"lora_down", "lora_up"}


@dataclass(frozen=True)
class Option:
    """One row of the table: config kwargs and the parameter names they must produce.

    ``params(spatial)`` gets whether the layer has a kernel with more than one element.
    """

    method: str
    name: str
    kwargs: dict = field(hash=False)
    params: Callable[[bool], set[str]] = field(hash=False)
    kinds: tuple[str, ...] = ALL_KINDS
    scale: float | None = None  # the scale the option gives; None: alpha / r

    @property
    def expected_scale(self) -> float:
        return self.kwargs["alpha"] / self.kwargs["r"] if self.scale is None else self.scale

    def config(self, **overrides) -> lyco.AdapterConfig:
        kw = {"target_modules": ["layer"], "init_weights": False, **self.kwargs, **overrides}
        return METHODS[self.method](**kw)


OPTIONS = [
    Option("full", "diff", {"r": 4, "alpha": 3}, lambda sp: {"diff", "diff_b"}, scale=1.0),  # every layer has a bias
    Option("lora", "plain", {"r": 2, "alpha": 6}, lambda sp: LORA),
    Option("lora", "rslora_scalar", {"r": 4, "alpha": 6, "use_rslora": True, "use_scalar": True},
           lambda sp: LORA | {"scalar"}, scale=3.0),  # alpha / √r; init_weights=False: scalar 1
    Option("loha", "rslora", {"r": 4, "alpha": 16, "use_rslora": True}, lambda sp: HADA, scale=8.0),
    Option("lokr", "full_matrix", {"r": 2, "alpha": 3, "full_matrix": True}, lambda sp: {"lokr_w1", "lokr_w2"},
           scale=1.0),
    Option("lokr", "scalar", {"r": 2, "alpha": 3, "use_scalar": True}, lambda sp: {"lokr_w1", "scalar"} | LOKR_W2_LOW),
    # DoRA (conftest.adapt shakes the magnitudes so that they matter)
    Option("lora", "dora", {"r": 2, "alpha": 6, "weight_decompose": True}, lambda sp: LORA | {"dora_scale"}),
    Option("lora", "dora_in_tucker", {"r": 2, "alpha": 6, "weight_decompose": True, "wd_on_out": False,
                                      "use_effective_conv2d": True},
           lambda sp: LORA | {"dora_scale"} | ({"lora_mid"} if sp else set()), CONV_KINDS),
    Option("loha", "dora", {"r": 2, "alpha": 16, "weight_decompose": True}, lambda sp: HADA | {"dora_scale"}),
    Option("loha", "dora_in", {"r": 2, "alpha": 16, "weight_decompose": True, "wd_on_out": False},
           lambda sp: HADA | {"dora_scale"}),
    Option("lokr", "dora_scalar", {"r": 2, "alpha": 3, "weight_decompose": True, "use_scalar": True},
           lambda sp: {"lokr_w1", "scalar", "dora_scale"} | LOKR_W2_LOW),
    Option("lokr", "dora_in", {"r": 2, "alpha": 3, "weight_decompose": True, "wd_on_out": False},
           lambda sp: {"lokr_w1", "dora_scale"} | LOKR_W2_LOW),
    Option("lora", "tucker", {"r": 2, "alpha": 6, "use_effective_conv2d": True},
           lambda sp: LORA | ({"lora_mid"} if sp else set()), CONV_KINDS),
    Option("loha", "plain", {"r": 2, "alpha": 16}, lambda sp: HADA),
    Option("loha", "effective_conv", {"r": 2, "alpha": 16, "use_effective_conv2d": True},
           lambda sp: HADA | ({"hada_t1", "hada_t2"} if sp else set()), CONV_KINDS),
    Option("lokr", "full", {"r": 8, "alpha": 5}, lambda sp: {"lokr_w1", "lokr_w2"}),
    Option("lokr", "low_rank_w2", {"r": 2, "alpha": 3}, lambda sp: {"lokr_w1"} | LOKR_W2_LOW),
    Option("lokr", "decompose_both", {"r": 2, "alpha": 3, "decompose_both": True},
           lambda sp: {"lokr_w1_a", "lokr_w1_b"} | LOKR_W2_LOW),
    Option("lokr", "effective_conv", {"r": 2, "alpha": 3, "use_effective_conv2d": True},
           lambda sp: {"lokr_w1"} | LOKR_W2_LOW | ({"lokr_t2"} if sp else set()), CONV_KINDS),
    Option("lokr", "decompose_factor", {"r": 2, "alpha": 3, "decompose_factor": 4},
           lambda sp: {"lokr_w1"} | LOKR_W2_LOW),
]  # fmt: skip

CASES = [pytest.param(o, k, id=f"{o.method}-{o.name}-{k}") for o in OPTIONS for k in o.kinds]
ZERO_INITS = [
    pytest.param(o, k, init, id=f"{o.method}-{o.name}-{k}-{init}")
    for o in OPTIONS
    for k in o.kinds
    for init in ((True, "lycoris") if o.method == "lokr" and not o.kwargs.get("use_scalar") else (True,))
]


def canonical(base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    return weight.T if isinstance(base, Conv1D) else weight


def naive_delta(opt: Option, base: nn.Module, adapter: nn.Module) -> torch.Tensor:
    """The seed formulas, written out here, laid out like the base weight; DoRA: what merging adds,
    ``m ⊙ (W + ΔW) / (‖W + ΔW‖ + ε) − W`` with the norm per output row or per input column."""
    delta = naive_factor_delta(opt, base, adapter)
    if not opt.kwargs.get("weight_decompose"):
        return delta
    w = canonical(base, base.weight).detach()
    total = w + canonical(base, delta)
    rows = total.reshape(total.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (total.dim() - 1))
    cols = total.transpose(0, 1).reshape(total.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (total.dim() - 2))
    norm = (rows if opt.kwargs.get("wd_on_out", True) else cols) + torch.finfo(total.dtype).eps
    return canonical(base, adapter.dora_scale * total / norm - w)


def naive_factor_delta(opt: Option, base: nn.Module, adapter: nn.Module) -> torch.Tensor:
    """``scale · ΔW`` of the factors by the seed formulas (the scalar, when there is one, is 1 here)."""
    p = dict(adapter.named_parameters())
    shape = canonical(base, base.weight).shape
    scale = opt.expected_scale
    if opt.method == "full":
        return canonical(base, p["diff"] * scale)
    if opt.method == "lora":
        up, down = p["lora_up"].flatten(1), p["lora_down"].flatten(1)
        if "lora_mid" in p:  # ΔW[p, q, k] = Σ_ij mid[i, j, k] · up[p, i] · down[j, q]
            delta = torch.einsum("ij...,pi,jq->pq...", p["lora_mid"], up, down)
        else:
            delta = (up @ down).reshape(shape)
        return canonical(base, delta * scale)
    if opt.method == "loha":
        if "hada_t1" in p:
            rebuild1 = torch.einsum("ij...,jr,ip->pr...", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
            rebuild2 = torch.einsum("ij...,jr,ip->pr...", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
            delta = rebuild1 * rebuild2
        else:
            delta = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(shape)
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        out_r, in_r = shape[0] // w1.shape[0], shape[1] // w1.shape[1]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = torch.einsum("ij...,ip,jr->pr...", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = (p["lokr_w2_a"] @ p["lokr_w2_b"]).reshape(out_r, in_r, *shape[2:])
        delta = torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2.contiguous())
    return canonical(base, delta * scale)


def bias_term(layer: lyco.AdaptedLayer, out: torch.Tensor) -> torch.Tensor | float:
    """The adapter's bias delta broadcast along the output channels (0 for methods that change weights only)."""
    db = layer.get_delta_bias("default")
    if db is None:
        return 0.0
    channel = layer.spec.channel_dim(out.dim())
    return db.detach().float().view(-1, *[1] * (out.dim() - channel - 1))


def spatial(base: nn.Module) -> bool:
    return base.weight.dim() > 2 and base.weight[0, 0].numel() > 1


# -- structure ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("opt", "kind"), CASES)
def test_parameters_follow_the_plan(opt, kind):
    _, layer = adapt(kind, opt.config())
    adapter = layer.lyco_adapters["default"]
    assert {n for n, _ in adapter.named_parameters()} == opt.params(spatial(layer.base_layer))
    assert set(adapter.plan.param_shapes().items()) == {(n, tuple(q.shape)) for n, q in adapter.tensors().items()}
    assert layer.scaling["default"] == pytest.approx(opt.expected_scale)
    assert not any(q.requires_grad for q in layer.base_layer.parameters())
    assert all(q.requires_grad for q in adapter.parameters())


# -- forward and delta ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("opt", "kind"), CASES)
def test_forward_equals_base_plus_delta(opt, kind):
    model, layer = adapt(kind, opt.config())
    model.eval()
    base, x = layer.base_layer, make_input(kind)
    delta = layer.get_delta_weight("default")
    assert delta.shape == base.weight.shape
    assert torch.count_nonzero(delta) == delta.numel(), "random adapter must move every weight"
    base_out = base(x)
    out = model(x)
    torch.testing.assert_close(out, base_out + reference_apply(base, x, delta) + bias_term(layer, out), atol=ATOL, rtol=RTOL)
    assert (out - base_out).abs().max() > MOVED, "the adapter must move the output far beyond the tolerance"


@pytest.mark.parametrize(("opt", "kind"), CASES)
def test_delta_equals_naive_formula(opt, kind):
    _, layer = adapt(kind, opt.config())
    got = layer.get_delta_weight("default")
    want = naive_delta(opt, layer.base_layer, layer.lyco_adapters["default"])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # the adapter's own delta is unscaled and canonical; the layer applies its scale once
    unscaled = canonical(layer.base_layer, layer.lyco_adapters["default"].delta_weight())
    want = naive_factor_delta(opt, layer.base_layer, layer.lyco_adapters["default"])
    torch.testing.assert_close(unscaled * opt.expected_scale, want, atol=ATOL, rtol=RTOL)


# -- merge ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("opt", "kind"), CASES)
def test_merge_unmerge_round_trip(opt, kind):
    model, layer = adapt(kind, opt.config())
    model.eval()
    x = make_input(kind)
    weight0 = layer.base_layer.weight.detach().clone()
    unmerged = model(x)
    delta = layer.get_delta_weight("default").detach()
    bias0 = layer.base_layer.bias.detach().clone()
    db = layer.get_delta_bias("default")
    model.merge_adapter()
    assert layer.merged and layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer.base_layer.weight, weight0 + delta, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.base_layer.bias, bias0 + (0 if db is None else db.detach()), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(model(x), unmerged, atol=ATOL, rtol=RTOL)
    with pytest.raises(lyco.MergeError):
        layer.merge()  # already merged
    model.unmerge_adapter()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, weight0, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.base_layer.bias, bias0, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(model(x), unmerged, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("opt", "kind"), CASES)
def test_merge_and_unload_returns_plain_module(opt, kind):
    model, layer = adapt(kind, opt.config())
    model.eval()
    x = make_input(kind)
    adapted = model(x)
    base = layer.base_layer
    plain = model.merge_and_unload()
    assert plain.layer is base and not isinstance(plain.layer, lyco.AdaptedLayer)
    torch.testing.assert_close(plain(x), adapted, atol=ATOL, rtol=RTOL)


# -- init ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("opt", "kind", "init"), ZERO_INITS)
def test_zero_init_is_identity(opt, kind, init):
    model, layer = adapt(kind, opt.config(init_weights=init))
    x = make_input(kind)
    assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
    for mode in (model.train, model.eval):
        mode()
        assert torch.equal(model(x), layer.base_layer(x))
    # the zero factor is one of several: the others are random so training can start (Full: one zero delta,
    # whose gradient is the base weight's)
    if opt.method == "full":
        assert layer.get_delta_bias("default").count_nonzero() == 0
        return
    assert sum(int(q.abs().sum() > 0) for q in layer.lyco_adapters["default"].parameters()) >= 1


# -- gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("opt", "kind"), CASES)
def test_gradients_only_on_adapter(opt, kind):
    model, layer = adapt(kind, opt.config())
    model.train()
    x = make_input(kind)
    model(x).square().mean().backward()
    base = layer.base_layer
    assert base.weight.grad is None and (base.bias is None or base.bias.grad is None)
    for name, q in layer.lyco_adapters["default"].named_parameters():
        assert q.grad is not None, name
        assert torch.isfinite(q.grad).all() and q.grad.abs().max() > 0, name


# -- half precision --------------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [True, False], ids=["fp32-adapter", "half-adapter"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("opt", "kind"), CASES)
def test_half_precision_forward(opt, kind, dtype, autocast):
    model, layer = adapt(kind, opt.config(), dtype=dtype, autocast_adapter_dtype=autocast)
    model.eval()
    adapter = layer.lyco_adapters["default"]
    assert adapter.dtype == (torch.float32 if autocast else dtype)
    assert layer.base_layer.weight.dtype == dtype
    x = make_input(kind, dtype=dtype)
    out = model(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # same maths in fp32 from the same (rounded) weights
    base32 = copy.deepcopy(layer.base_layer).float()
    delta32 = layer.get_delta_weight("default").detach().float()
    want = base32(x.float()) + reference_apply(base32, x.float(), delta32)
    want = want + bias_term(layer, want)
    tol = HALF_TOL[dtype]
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    # and a half-precision merge keeps the base dtype
    model.merge_adapter()
    assert layer.base_layer.weight.dtype == dtype
    torch.testing.assert_close(model(x).float(), want, atol=4 * tol, rtol=4 * tol)
