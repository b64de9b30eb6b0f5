"""torch.compile: adapted models trace as one graph (no graph break caused by lyco) and compiled
forward + backward equal eager, on the dense and the factored path, and after set_adapter / disable /
merge (recompiles allowed, errors not).

Graph breaks are counted with ``torch._dynamo.explain``; fwd+bwd runs with ``fullgraph=True`` on the
``aot_eager`` backend (dynamo + AOTAutograd, the same tracing inductor gets, without C++ compilation);
one test runs the default inductor backend end to end.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import lyco

PATHS = ("dense", "factored")


class Block(nn.Module):
    """Two linears and a 3×3 conv: every adapter kind (factored-capable linear, CP conv) in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 48)
        self.v = nn.Linear(48, 32)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.v(torch.relu(self.q(x))).square().mean() + self.conv(img).square().mean()


CONFIGS = {
    "lora_tucker": lambda **kw: lyco.LoRAConfig(r=4, use_effective_conv2d=True, **kw),
    "lora": lambda **kw: lyco.LoRAConfig(r=2, **kw),
    "loha_cp": lambda **kw: lyco.LoHaConfig(r=4, use_effective_conv2d=True, **kw),
    "loha": lambda **kw: lyco.LoHaConfig(r=2, **kw),
    "lokr_both": lambda **kw: lyco.LoKrConfig(r=2, decompose_both=True, use_effective_conv2d=True, **kw),
    "lokr": lambda **kw: lyco.LoKrConfig(r=8, **kw),
    "lora_scalar_rs": lambda **kw: lyco.LoRAConfig(r=2, use_scalar=True, use_rslora=True, **kw),
    "loha_scalar": lambda **kw: lyco.LoHaConfig(r=2, use_scalar=True, **kw),
    "lokr_scalar_full": lambda **kw: lyco.LoKrConfig(r=2, use_scalar=True, full_matrix=True, **kw),
    "full": lambda **kw: lyco.FullConfig(**kw),
    "lora_dora": lambda **kw: lyco.LoRAConfig(r=2, use_dora=True, **kw),
    "loha_dora_in": lambda **kw: lyco.LoHaConfig(r=2, weight_decompose=True, wd_on_out=False, **kw),
    "lokr_dora": lambda **kw: lyco.LoKrConfig(r=2, weight_decompose=True, decompose_both=True, **kw),
}
INPUTS = (torch.randn(3, 32, generator=torch.Generator().manual_seed(1)),
          torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2)))  # fmt: skip


def adapted(name: str, **kw) -> lyco.LycoModel:
    torch.manual_seed(0)
    return lyco.get_model(Block(), CONFIGS[name](target_modules=["q", "v", "conv"], init_weights=False, **kw))


def set_path(model: lyco.LycoModel, path: str | None) -> None:
    for _, layer in model.adapted_layers():
        for adapter in layer.lyco_adapters.values():
            adapter.path = path


def step(module: nn.Module, params: list[nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in params:
        p.grad = None
    out = module(*INPUTS)
    out.backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_graph_breaks(name, path):
    """Training mode with rank and module dropout (random draws stay in the graph): one graph, no break."""
    model = adapted(name, rank_dropout=0.25, module_dropout=0.25)
    set_path(model, path)
    model.train()
    explanation = torch._dynamo.explain(model)(*INPUTS)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    model.eval()
    assert torch._dynamo.explain(model)(*INPUTS).graph_break_count == 0


@pytest.mark.parametrize("path", PATHS)
def test_lyco_path_env_traces_without_breaks(path, monkeypatch):
    """``LYCO_PATH`` (read while tracing) forces the path without breaking the graph; outputs equal eager."""
    monkeypatch.setenv("LYCO_PATH", path)
    torch._dynamo.reset()
    model = adapted("lokr")
    explanation = torch._dynamo.explain(model)(*INPUTS)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*INPUTS), model(*INPUTS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_forward_backward_equals_eager(name):
    """fullgraph=True fwd+bwd on both paths, then after set_adapter (one, a list), disable_adapter and
    merge: each state recompiles and gives eager's outputs and gradients."""
    torch._dynamo.reset()
    model = adapted(name)
    model.add_adapter("other", CONFIGS[name](target_modules=["q", "conv"], init_weights=False, alpha=3))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)

    def check() -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        want, got = step(model, params), step(compiled, params)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for g, w in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)

    with torch._dynamo.config.patch(recompile_limit=32):
        for path in (*PATHS, None):
            set_path(model, path)
            check()
        model.set_adapter("other")
        check()
        model.set_adapter(["default", "other"])
        check()
        with model.disable_adapter(), torch.no_grad():
            torch.testing.assert_close(compiled(*INPUTS), model(*INPUTS))
        model.merge_adapter()
        with torch.no_grad():
            torch.testing.assert_close(compiled(*INPUTS), model(*INPUTS), rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
        check()
    assert 5 <= counter.frame_count <= 12  # one graph per distinct state, never one per call


def test_path_switch_recompiles_to_the_chosen_path():
    """``adapter.path`` is guarded: switching it after compilation re-traces (the new path is really used)."""
    torch._dynamo.reset()
    model = adapted("loha")
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    set_path(model, "dense")
    compiled(*INPUTS)
    compiled(*INPUTS)
    assert counter.frame_count == 1
    set_path(model, "factored")
    compiled(*INPUTS)
    assert counter.frame_count == 2


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_inductor_training_steps_match_eager(device):
    """Default backend (inductor: C++ on CPU, Triton on CUDA): three SGD steps of a compiled adapted block
    equal eager."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch._dynamo.reset()
    inputs = tuple(t.to(device) for t in INPUTS)
    losses = {}
    for mode in ("eager", "inductor"):
        model = adapted("loha_cp", rank_dropout=0.0).to(device)
        set_path(model, "factored")
        run = torch.compile(model) if mode == "inductor" else model
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        losses[mode] = []
        for _ in range(3):
            loss = run(*inputs)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[mode].append(loss.item())
    assert losses["eager"][-1] < losses["eager"][0]
    torch.testing.assert_close(losses["inductor"], losses["eager"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["loha", "lokr_both"])
def test_transformers_llama_is_one_graph(name):
    """A tiny transformers Llama with adapters on every linear (dropouts on) traces as one graph, and the
    compiled loss and adapter gradients equal eager."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = lyco.get_model(
        transformers.LlamaForCausalLM(cfg),
        CONFIGS[name](target_modules="all-linear", init_weights=False, rank_dropout=0.1, module_dropout=0.1),
    )
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    model.train()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [b.reason for b in explanation.break_reasons]
    model.eval()  # deterministic: compare compiled with eager
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for module in (model, compiled):
        for p in params:
            p.grad = None
        loss = module(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
