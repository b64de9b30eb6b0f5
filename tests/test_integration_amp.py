"""Mixed precision: ``torch.autocast`` (bf16 and fp16, CPU; CUDA when present) and fp32 master adapter
weights on a bf16 base model.

Autocast-correct means: no dtype errors in forward or backward (the custom autograd functions of
``ops.hadamard`` get autocast-produced half inputs in forward and fp32 saved factors in backward),
parameter gradients in the parameters' dtype (fp32), and values within half precision of the fp32
computation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lyco
from conftest import hada_delta_naive
from lyco.ops.hadamard import hada_delta, hada_delta_cp

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
HALF = [torch.bfloat16, torch.float16]


def need(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cp", [False, True])
def test_hadamard_autograd_under_autocast(cp, dtype, device):
    """The custom autograd functions under autocast: half output, fp32 grads close to plain autograd's."""
    need(device)
    g = torch.Generator().manual_seed(0)
    shapes = (
        {"hada_t1": (3, 3, 3, 3), "hada_w1_a": (3, 16), "hada_w1_b": (3, 8), "hada_t2": (3, 3, 3, 3),
         "hada_w2_a": (3, 16), "hada_w2_b": (3, 8)}
        if cp else {"hada_w1_a": (24, 4), "hada_w1_b": (4, 20), "hada_w2_a": (24, 4), "hada_w2_b": (4, 20)}
    )  # fmt: skip
    params = {k: torch.randn(s, generator=g).to(device).requires_grad_() for k, s in shapes.items()}
    weight = torch.randn(hada_delta_naive(**params).shape, generator=g).to(device)

    def grads(fn, autocast: bool):
        for p in params.values():
            p.grad = None
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            out = fn(**params)
        (out.float() * weight).sum().backward()
        return out, {k: p.grad for k, p in params.items()}

    custom = (lambda **p: hada_delta_cp(**p)) if cp else (lambda **p: hada_delta(**p))
    out, got = grads(custom, autocast=True)
    ref_out, want = grads(hada_delta_naive, autocast=False)
    assert out.dtype == dtype  # the products ran in half precision, as autocast asks
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    assert rel_err(out, ref_out) < tol
    for k, grad in got.items():
        assert grad.dtype == torch.float32, k
        assert rel_err(grad, want[k]) < tol, k


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).relu().mean((-1, -2))
        return self.fc2(self.fc1(h).relu())


METHODS = {
    "lora": lambda: lyco.LoRAConfig(r=4, use_effective_conv2d=True, target_modules=["conv", "fc1", "fc2"], init_weights=False),
    "loha": lambda: lyco.LoHaConfig(r=4, use_effective_conv2d=True, target_modules=["conv", "fc1", "fc2"], init_weights=False),
    "lokr": lambda: lyco.LoKrConfig(r=2, decompose_both=True, target_modules=["conv", "fc1", "fc2"], init_weights=False),
    "lora-scalar": lambda: lyco.LoRAConfig(r=4, use_scalar=True, use_rslora=True, target_modules=["conv", "fc1", "fc2"],
                                           init_weights=False),
    "full": lambda: lyco.FullConfig(target_modules=["conv", "fc1", "fc2"], init_weights=False),
    "lora-dora": lambda: lyco.LoRAConfig(r=4, use_dora=True, target_modules=["conv", "fc1", "fc2"], init_weights=False),
    "lokr-dora-in": lambda: lyco.LoKrConfig(r=2, weight_decompose=True, wd_on_out=False, target_modules=["conv", "fc1", "fc2"],
                                            init_weights=False),
}
X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))


def loss_and_grads(model: lyco.LycoModel, x: torch.Tensor, autocast: torch.dtype | None, device: str):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(x)
    out.float().square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["dense", "factored"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", list(METHODS))
def test_model_under_autocast(method, dtype, path, device):
    """An adapted model (conv with CP/Kronecker, linears on the chosen path) under autocast: half outputs,
    fp32 gradients of the fp32 adapters, close to the fp32 run."""
    need(device)
    torch.manual_seed(0)
    model = lyco.get_model(Net(), METHODS[method]()).to(device)
    for _, layer in model.adapted_layers():
        for a in layer.lyco_adapters.values():
            a.path = path
    x = X.to(device)
    out, got = loss_and_grads(model, x, dtype, device)
    ref, want = loss_and_grads(model, x, None, device)
    assert out.dtype == dtype
    tol = 6e-2 if dtype == torch.bfloat16 else 2e-2
    assert rel_err(out, ref) < tol
    assert got.keys() == want.keys() and got
    for name, grad in got.items():
        assert grad.dtype == torch.float32, name
        assert rel_err(grad, want[name]) < 3 * tol, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_fp32_master_adapters_on_bf16_base(method, device):
    """bf16 base weights, fp32 adapters (``autocast_adapter_dtype=True``, the default): outputs stay bf16,
    gradients and optimizer updates are fp32, training lowers the loss and tracks an all-fp32 run."""
    need(device)
    torch.manual_seed(0)
    base = Net()
    ref_model = lyco.get_model(copy.deepcopy(base), METHODS[method]()).to(device)
    model = lyco.get_model(base.to(torch.bfloat16), METHODS[method]()).to(device)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in ref_model.state_dict().items()})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "base_layer" in n)
    x = X.to(device)
    losses = {}
    for name, m in (("bf16", model), ("fp32", ref_model)):
        xin = x.to(torch.bfloat16) if name == "bf16" else x
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        losses[name] = []
        for _ in range(5):
            out = m(xin)
            loss = out.float().square().mean()
            loss.backward()
            if name == "bf16":
                assert out.dtype == torch.bfloat16
                assert all(p.grad.dtype == torch.float32 for p in trainable)
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["bf16"][-1] < losses["bf16"][0]
    torch.testing.assert_close(torch.tensor(losses["bf16"]), torch.tensor(losses["fp32"]), rtol=5e-2, atol=1e-3)
