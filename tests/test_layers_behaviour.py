"""Shared AdaptedLayer behaviour, per method × layer kind: rank and module dropout, several adapters,
scaling (``set_scale`` / ``scale_layer`` / ``unscale_layer``), safe merge, ``scaling == alpha / r``."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

import lyco
from conftest import LAYER_KINDS, adapt, channel_dim, make_input, make_layer, reference_apply
from lyco.methods import METHODS as REGISTRY

ATOL = RTOL = 1e-5  # fp32 comparisons
R, ALPHA = 2, 6  # low-rank factors for both methods on every kind (see conftest), scaling 3
METHODS = {"lora": lyco.LoRAConfig, "loha": lyco.LoHaConfig, "lokr": lyco.LoKrConfig, "full": lyco.FullConfig,
           # DoRA (conftest.adapt shakes the magnitudes); its (g - 1)·W·x part is not a rank-dropout row
           "lora+dora": partial(lyco.LoRAConfig, weight_decompose=True),
           "loha+dora": partial(lyco.LoHaConfig, weight_decompose=True),
           "lokr+dora-in": partial(lyco.LoKrConfig, weight_decompose=True, wd_on_out=False)}  # fmt: skip
PLAIN = [m for m in METHODS if "dora" not in m]  # the tests that read rank dropout per output channel
GRID = [pytest.param(m, k, id=f"{m}-{k}") for m in METHODS for k in LAYER_KINDS]
# (method, extra config, whether kept rows are rescaled by 1 / kept fraction)
RESCALE = [
    pytest.param("loha", {}, True, id="loha-default-rescales"),  # PEFT's LoHa always rescales
    pytest.param("loha", {"rank_dropout_scale": False}, False, id="loha-no-rescale"),  # lycoris-lora's default
    pytest.param("lokr", {}, False, id="lokr-default-no-rescale"),
    pytest.param("lokr", {"rank_dropout_scale": True}, True, id="lokr-rank_dropout_scale"),
    pytest.param("full", {}, False, id="full-default-no-rescale"),  # lycoris-lora's full: rank_dropout_scale=False
]


def config(method: str, **kwargs) -> lyco.AdapterConfig:
    kw = {"r": R, "alpha": ALPHA, "target_modules": ["layer"], "init_weights": False, **kwargs}
    return METHODS[method](**kw)


def scaling(method: str, r: int, alpha: float) -> float:
    """The method's own scale rule (``alpha / r``; Full: 1)."""
    cfg = config(method)
    return REGISTRY[cfg.peft_type].config_scaling(cfg, r, alpha)


def delta_out(layer: lyco.AdaptedLayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Reference adapter contribution (no dropout): ``get_delta_weight`` applied the base layer's way, plus
    the bias delta along the output channels (Full)."""
    out = reference_apply(layer.base_layer, x, layer.get_delta_weight(name).detach())
    db = layer.get_delta_bias(name)
    if db is not None:
        dim = layer.spec.channel_dim(out.dim())  # 0 for unbatched conv input
        out = out + db.detach().view(-1, *[1] * (out.dim() - dim - 1))
    return out


def per_channel(t: torch.Tensor, base) -> torch.Tensor:
    """``(channels, everything else)`` view of a layer output."""
    return t.movedim(channel_dim(base), 0).reshape(t.shape[channel_dim(base)], -1)


# -- rank dropout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
@pytest.mark.parametrize(("method", "extra", "rescale"), RESCALE)
def test_rank_dropout_masks_output_channels(method, extra, rescale, kind):
    model, layer = adapt(kind, config(method, rank_dropout=0.5, **extra))
    base, x = layer.base_layer, make_input(kind)
    full = per_channel(delta_out(layer, x), base)
    assert (full.abs().amax(1) > 0).all()
    model.train()
    with torch.no_grad():
        outs = [per_channel(model(x) - base(x), base) for _ in range(2)]
    for got in outs:
        kept = got.abs().amax(1) > 0
        assert 0 < int(kept.sum()) < kept.numel(), "p=0.5 over 64 channels keeps some and drops some"
        factor = 1 / kept.float().mean() if rescale else 1.0
        torch.testing.assert_close(got, full * kept[:, None] * factor, atol=ATOL, rtol=1e-4)
    assert not torch.equal(outs[0], outs[1]), "a new mask per forward"
    model.eval()
    torch.testing.assert_close(model(x), base(x) + delta_out(layer, x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
@pytest.mark.parametrize(("method", "extra", "rescale"), RESCALE)
def test_rank_dropout_all_rows_dropped_is_finite(method, extra, rescale, kind):
    """Regression: PEFT divides by the kept fraction, 0/0 = NaN when every row is dropped."""
    model, layer = adapt(kind, config(method, rank_dropout=1.0, **extra))
    model.train()
    x = make_input(kind)
    out = model(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, layer.base_layer(x))
    out.sum().backward()
    assert all(torch.isfinite(q.grad).all() for q in layer.lyco_adapters["default"].parameters())


@pytest.mark.parametrize(("method", "kind"), GRID)
def test_merge_in_train_mode_ignores_rank_dropout(method, kind):
    """Regression: PEFT merges a randomly masked delta when merging in training mode."""
    model, layer = adapt(kind, config(method, rank_dropout=0.5))
    model.eval()
    weight0 = layer.base_layer.weight.detach().clone()
    want = weight0 + layer.get_delta_weight("default").detach()
    merged = []
    for _ in range(2):
        m = copy.deepcopy(model).train()
        m.merge_adapter()
        merged.append(m.model.layer.base_layer.weight.detach())
    assert torch.equal(merged[0], merged[1])
    torch.testing.assert_close(merged[0], want, atol=ATOL, rtol=RTOL)


# -- module dropout ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "kind"), GRID)
def test_module_dropout(method, kind):
    model, layer = adapt(kind, config(method, module_dropout=1.0))
    x = make_input(kind)
    base_out = layer.base_layer(x)
    model.train()
    assert torch.equal(model(x), base_out)
    model.eval()
    torch.testing.assert_close(model(x), base_out + delta_out(layer, x), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(model(x), base_out, atol=100 * ATOL)


@pytest.mark.parametrize("method", list(METHODS))
def test_module_dropout_half_skips_sometimes(method):
    model, layer = adapt("linear", config(method, module_dropout=0.5))
    model.train()
    x = make_input("linear")
    skipped = [torch.equal(model(x), layer.base_layer(x)) for _ in range(40)]
    assert any(skipped) and not all(skipped)


# -- several adapters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("other_method", list(METHODS))
@pytest.mark.parametrize(("method", "kind"), GRID)
def test_active_adapters_sum(method, kind, other_method):
    model, layer = adapt(kind, config(method))
    model.add_adapter("other", config(other_method, r=4, alpha=2))
    model.eval()
    x = make_input(kind)
    base_out = layer.base_layer(x)
    d1, d2 = delta_out(layer, x, "default"), delta_out(layer, x, "other")
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(model(x), base_out + d1, atol=ATOL, rtol=RTOL)
    model.set_adapter("other")
    torch.testing.assert_close(model(x), base_out + d2, atol=ATOL, rtol=RTOL)
    model.set_adapter(["default", "other"])
    both = model(x)
    torch.testing.assert_close(both, base_out + d1 + d2, atol=ATOL, rtol=RTOL)
    with model.disable_adapter():
        assert torch.equal(model(x), base_out)
    weight0 = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert layer.merged_adapters == ["default", "other"]
    torch.testing.assert_close(model(x), both, atol=ATOL, rtol=RTOL)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, weight0, atol=ATOL, rtol=RTOL)


# -- scaling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "kind"), [p for p in GRID if "dora" not in p.values[0]])  # DoRA: not linear in s
def test_set_scale_scale_layer_unscale_layer(method, kind):
    model, layer = adapt(kind, config(method))
    model.add_adapter("other", config(method, r=4, alpha=2))
    model.eval()
    x = make_input(kind)
    base_out = layer.base_layer(x)
    d1 = delta_out(layer, x)
    default, other = scaling(method, R, ALPHA), scaling(method, 4, 2)

    def check(scale_default: float, scale_other: float) -> None:
        assert layer.scaling["default"] == pytest.approx(scale_default * default)
        assert layer.scaling["other"] == pytest.approx(scale_other * other)
        torch.testing.assert_close(model(x), base_out + scale_default * d1, atol=ATOL, rtol=RTOL)

    check(1, 1)
    model.set_scale("default", 2.0)  # scale · alpha / r, the other adapter untouched
    check(2, 1)
    layer.set_scale("default", 0.5)
    check(0.5, 1)
    layer.scale_layer(4.0)  # active adapters only
    check(2, 1)
    layer.unscale_layer(2.0)
    check(1, 1)
    layer.scale_layer(3.0)
    layer.unscale_layer()  # reset to alpha / r
    check(1, 1)
    model.set_scale("default", 0.0)
    assert torch.equal(model(x), base_out)


@pytest.mark.parametrize(("r", "alpha"), [(1, 1), (2, 6), (4, 1), (8, 3.5), (16, 64)])
@pytest.mark.parametrize("method", PLAIN)
def test_scaling_is_alpha_over_r(method, r, alpha):
    _, layer = adapt("linear", config(method, r=r, alpha=alpha))
    adapter = layer.lyco_adapters["default"]
    assert adapter.r == layer.r["default"] == r
    assert layer.alpha["default"] == alpha
    want = 1.0 if method == "full" else alpha / r  # Full has no rank: scale 1 (lycoris-lora's rule)
    assert layer.scaling["default"] == scaling(method, r, alpha) == want
    torch.testing.assert_close(
        layer.get_delta_weight("default"), adapter.delta_weight() * want, atol=ATOL, rtol=RTOL
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_rank_and_alpha_patterns(method):
    _, layer = adapt("linear", config(method, rank_pattern={"layer": 4}, alpha_pattern={"layer": 12}))
    assert layer.r["default"] == 4
    assert layer.scaling["default"] == scaling(method, 4, 12)


@pytest.mark.parametrize(("method", "kind"), [p for p in GRID if "dora" in p.values[0]])
def test_dora_scale_acts_inside_the_norm(method, kind):
    """PEFT's rule: ``set_scale(k)`` gives ``m ⊙ (W + k·s·ΔW) / ‖W + k·s·ΔW‖`` — the adapter built with alpha·k."""
    model, layer = adapt(kind, config(method))
    torch.manual_seed(0)
    twice, twice_layer = adapt(kind, config(method, alpha=2 * ALPHA))
    twice_layer.lyco_adapters["default"].load_state_dict(layer.lyco_adapters["default"].state_dict())
    model.set_scale("default", 2.0)
    x = make_input(kind)
    model.eval()
    twice.eval()
    torch.testing.assert_close(model(x), twice(x), atol=ATOL, rtol=RTOL)


# -- safe merge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize(("method", "kind"), GRID)
def test_safe_merge_rejects_broken_adapter(method, kind, bad):
    model, layer = adapt(kind, config(method))
    first = next(iter(layer.lyco_adapters["default"].parameters()))
    with torch.no_grad():
        first.view(-1)[0] = bad
    weight0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(lyco.MergeError) as info:
        layer.merge(safe_merge=True)
    assert isinstance(info.value, ValueError) and isinstance(info.value, lyco.LycoError)
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(lyco.MergeError):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, weight0)
    assert not layer.merged and isinstance(model.model.layer, lyco.AdaptedLayer)


@pytest.mark.parametrize(("method", "kind"), GRID)
def test_safe_merge_of_healthy_adapter_merges(method, kind):
    model, layer = adapt(kind, config(method))
    want = layer.base_layer.weight.detach() + layer.get_delta_weight("default").detach()
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, want, atol=ATOL, rtol=RTOL)


# -- AdaptedLayer without a model -----------------------------------------------------------------------
@pytest.mark.parametrize(("method", "kind"), GRID)
def test_adapted_layer_built_directly(method, kind):
    """``AdaptedLayer`` + the registered adapter class, no ``get_model``: same maths."""
    cfg = config(method)
    base = make_layer(kind)
    layer = lyco.AdaptedLayer(base)
    layer.lyco_adapters["a"] = REGISTRY[cfg.peft_type](layer.spec, R, ALPHA, cfg)
    layer.active_adapters = ["a"]
    layer.eval()
    x = make_input(kind)
    torch.testing.assert_close(layer(x), base(x) + delta_out(layer, x, "a"), atol=ATOL, rtol=RTOL)


def test_adapted_layer_rejects_unsupported_module():
    with pytest.raises(lyco.UnsupportedLayerError, match="Embedding") as info:
        lyco.AdaptedLayer(torch.nn.Embedding(4, 8), "emb")
    assert isinstance(info.value, TypeError)


# -- merged-state and unbatched-input regressions -----------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_rescaling_a_merged_adapter_is_refused(method):
    """Regression: unmerge subtracts the delta at the current scaling, so rescaling a merged adapter
    used to leave a residue in the base weight; now it raises and changes nothing."""
    model, layer = adapt("linear", config(method))
    weight0 = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    merged = layer.base_layer.weight.detach().clone()
    for rescale in (
        lambda: model.set_scale("default", 2.0),
        lambda: layer.set_scale("default", 2.0),
        lambda: layer.scale_layer(2.0),
        lambda: layer.unscale_layer(),
    ):
        with pytest.raises(lyco.MergeError):
            rescale()
        assert layer.scaling["default"] == scaling(method, R, ALPHA)
        assert torch.equal(layer.base_layer.weight, merged)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, weight0, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
@pytest.mark.parametrize("method", PLAIN)
def test_rank_dropout_unbatched_conv_input(method, kind):
    """Regression: the rank-dropout mask must land on the channel dim of unbatched conv input (dim 0)."""
    model, layer = adapt(kind, config(method, rank_dropout=0.5))
    x = make_input(kind)[0]  # nn.Conv1d/Conv2d accept unbatched (C, *spatial)
    base = layer.base_layer
    full = delta_out(layer, x).reshape(base.out_channels, -1)
    model.train()
    with torch.no_grad():
        got = (model(x) - base(x)).reshape(base.out_channels, -1)
    kept = got.abs().amax(1) > 0
    assert 0 < int(kept.sum()) < kept.numel()
    factor = 1 / kept.float().mean() if method == "loha" else 1.0  # LoKr, Full, LoRA: rank_dropout_scale=False
    torch.testing.assert_close(got, full * kept[:, None] * factor, atol=ATOL, rtol=1e-4)
