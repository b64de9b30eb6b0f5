"""Sharded training of a lyco-adapted model with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    torchrun --nproc-per-node 2 examples/fsdp2_train.py --steps 10        # CPU (gloo) or GPUs (nccl)

Recipe:
1. Adapt the unsharded model (``lyco.get_model``), then ``fully_shard`` each block and the root. Frozen
   base weights and trainable adapters may share one FSDP group.
2. Train as usual; the optimizer sees the sharded (DTensor) adapter parameters.
3. ``model.save_pretrained(dir)`` on **every** rank: lyco gathers the adapter shards and rank 0 writes a
   normal, unsharded PEFT-layout adapter.
4. Merging needs full weights: ``merge_adapter()`` on a sharded model raises ``lyco.MergeError``. Load the
   saved adapter into an unsharded base on one process and merge there (done below on rank 0).
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import lyco


class Block(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(3)], nn.Linear(32, 4))


def main(argv: list[str] | None = None) -> dict[str, float] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("lyco_fsdp2_out"))
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    result = train(args, rank, world, device)
    gc.collect()  # the sharded model dies before its process group does (teardown order matters for gloo)
    dist.barrier()
    dist.destroy_process_group()
    return result


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, float] | None:
    model = lyco.get_model(base_model(), lyco.LoKrConfig(r=4, alpha=4, target_modules=["fc1", "fc2"], init_weights=False))
    model.to(device)
    for block in list(model.model)[:-1]:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 32, generator=g), torch.randint(0, 4, (32,), generator=g)
    per_rank = x.shape[0] // world
    xs, ys = x[rank * per_rank: (rank + 1) * per_rank].to(device), y[rank * per_rank: (rank + 1) * per_rank].to(device)
    for step in range(args.steps):
        loss = nn.functional.cross_entropy(model(xs), ys)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        sharded_out = model(x.to(device)).cpu()
    model.save_pretrained(args.out)  # collective: every rank calls it, rank 0 writes the full adapter
    try:
        model.merge_adapter()
    except lyco.MergeError as exc:
        if rank == 0:
            print(f"merge on the sharded model refused, as expected: {str(exc)[:80]}...")

    result = None
    if rank == 0:  # merge on an unsharded copy
        merged = lyco.LycoModel.from_pretrained(base_model(), args.out).merge_and_unload()
        with torch.no_grad():
            diff = (merged(x) - sharded_out).abs().max().item()
        print(f"merged (rank 0, unsharded) vs sharded model: max diff {diff:.2e}")
        result = {"merged_diff": diff}
    return result


if __name__ == "__main__":
    main()
