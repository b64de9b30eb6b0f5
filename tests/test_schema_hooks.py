"""The methods' file hooks agree with their adapters: ``compose`` is the adapter's ΔW, ``matvec`` is ΔW·v
without ΔW, ``infer_plan`` rebuilds the adapter's plan, ``rank`` / ``guess_weight_shape`` read the tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lyco
from lyco.formats import ModuleAdapter
from lyco.methods.registry import adapter_class_for
from lyco.ops.layerops import LayerSpec

TOL = 1e-5  # fp32, relative to the ΔW scale

LAYERS = {
    "linear": LayerSpec("linear", 24, 18, ()),
    "conv1d": LayerSpec("conv", 16, 12, (3,)),
    "conv2d": LayerSpec("conv", 16, 8, (3, 3)),
    "conv2d_1x1": LayerSpec("conv", 16, 8, (1, 1)),
}
CONFIGS = {
    "loha": lambda r: lyco.LoHaConfig(r=r, init_weights=False),
    "loha_cp": lambda r: lyco.LoHaConfig(r=r, init_weights=False, use_effective_conv2d=True),
    "lokr": lambda r: lyco.LoKrConfig(r=r, init_weights=False),
    "lokr_both": lambda r: lyco.LoKrConfig(r=r, init_weights=False, decompose_both=True),
    "lokr_cp": lambda r: lyco.LoKrConfig(r=r, init_weights=False, use_effective_conv2d=True),
    "lokr_factor": lambda r: lyco.LoKrConfig(r=r, init_weights=False, decompose_factor=2),
}


def adapter(cfg_name: str, layer: str, r: int, seed: int) -> lyco.Adapter:
    torch.manual_seed(seed)
    config = CONFIGS[cfg_name](r)
    return adapter_class_for(config)(LAYERS[layer], r, float(r), config)


@settings(max_examples=60, deadline=None)
@given(cfg_name=st.sampled_from(sorted(CONFIGS)), layer=st.sampled_from(sorted(LAYERS)), r=st.integers(1, 9),
       seed=st.integers(0, 10**6))  # fmt: skip
def test_hooks_agree_with_the_adapter(cfg_name, layer, r, seed):
    a = adapter(cfg_name, layer, r, seed)
    spec = LAYERS[layer]
    tensors = {k: v.detach() for k, v in a.tensors().items()}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    with torch.no_grad():
        dense = a.delta_weight()
        assert dense.shape == spec.weight_shape
        torch.testing.assert_close(type(a).compose(tensors, a.plan).reshape(dense.shape), dense, atol=0, rtol=0)
        v = torch.randn(math.prod(spec.weight_shape[1:]), 5, generator=torch.Generator().manual_seed(seed))
        scale = float(dense.abs().max()) * math.sqrt(v.shape[0])
        torch.testing.assert_close(type(a).matvec(tensors, a.plan, v), dense.reshape(dense.shape[0], -1) @ v,
                                   atol=TOL * scale, rtol=0)  # fmt: skip
    assert type(a).infer_plan(shapes, spec.weight_shape, r) == a.plan
    m = ModuleAdapter(type(a).algo, tensors, alpha=float(r), weight_shape=spec.weight_shape)
    assert m.rank == (None if not a.plan.ranked else r)
    guessed = m.method.guess_weight_shape(shapes)
    assert math.prod(guessed) == math.prod(spec.weight_shape) and guessed[0] == spec.out_features


def test_lora_file_hooks():
    g = torch.Generator().manual_seed(0)
    m = ModuleAdapter("lora", {"lora_down": torch.randn(3, 8, 3, 3, generator=g),
                               "lora_up": torch.randn(16, 3, 1, 1, generator=g)}, alpha=6.0)  # fmt: skip
    assert m.rank == 3 and m.scale() == 2.0 and m.guess_weight_shape() == (16, 8, 3, 3)
    dense = m.delta_weight()
    v = torch.randn(72, 4, generator=g)
    torch.testing.assert_close(m.matvec(v), dense.reshape(16, -1) @ v, atol=1e-4, rtol=0)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_a_small_file_naming_a_huge_layer_is_refused_not_allocated(algo):
    """(65536, 1) factors: a 1 MiB module whose dense ΔW would be 16 GiB."""
    n = 65536
    tensors = {
        "lora": {"lora_down": torch.ones(1, n), "lora_up": torch.ones(n, 1)},
        "loha": {"hada_w1_a": torch.ones(n, 1), "hada_w1_b": torch.ones(1, n), "hada_w2_a": torch.ones(n, 1),
                 "hada_w2_b": torch.ones(1, n)},
        "lokr": {"lokr_w1": torch.ones(256, 256), "lokr_w2_a": torch.ones(256, 1), "lokr_w2_b": torch.ones(1, 256)},
    }[algo]  # fmt: skip
    m = ModuleAdapter(algo, tensors, alpha=1.0)
    with pytest.raises(lyco.FormatError, match=r"16\.0 GiB.*base"):
        m.delta_weight()
    v = torch.ones(n, 2)
    assert m.matvec(v).shape == (n, 2)  # factored: no dense ΔW
