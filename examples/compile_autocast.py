"""torch.compile + autocast with lyco adapters: a bf16 base model, fp32 adapter weights, one graph.

    python examples/compile_autocast.py --steps 5 [--backend inductor]

- The adapted model traces with no graph break (rank and module dropout included): the script prints
  ``torch._dynamo.explain``'s count before training.
- ``LYCO_PATH=dense|factored`` (or ``adapter.path``) picks the forward path; it is read while tracing,
  so switch it through ``adapter.path`` on a compiled model (guarded: it recompiles).
- With a bf16 base the adapters stay fp32 (``autocast_adapter_dtype=True``): master weights and
  optimizer state in fp32, activations in bf16 under ``torch.autocast``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lyco


class Block(nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    parser.add_argument("--method", choices=["loha", "lokr"], default="loha")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    torch.manual_seed(0)
    base = nn.Sequential(Block(), Block(), nn.Linear(64, 10)).to(device, torch.bfloat16)
    cfg_cls = lyco.LoHaConfig if args.method == "loha" else lyco.LoKrConfig
    model = lyco.get_model(base, cfg_cls(r=4, alpha=4, target_modules=["up", "down"], init_weights=False,
                                         rank_dropout=0.1, module_dropout=0.1))  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)  # fp32 master adapter weights

    x = torch.randn(16, 8, 64, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 10, (16, 8), device=device)
    model.train()
    with torch.autocast(device, dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(x)
    print(f"graphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}")

    compiled = torch.compile(model, backend=args.backend)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for step in range(args.steps):
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = compiled(x)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        print(f"step {step}: loss {loss.item():.4f}")
    return {"graph_breaks": explanation.graph_break_count, "first_loss": losses[0], "last_loss": losses[-1]}


if __name__ == "__main__":
    main()
