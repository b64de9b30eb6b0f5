"""Data-parallel training of a lyco-adapted model with plain PyTorch DDP.

    torchrun --nproc-per-node 2 examples/ddp_train.py --steps 20          # CPU (gloo) or one GPU per rank

Nothing lyco-specific is needed: adapt first, then wrap in ``DistributedDataParallel``. Module dropout
is a 0/1 factor inside the graph (not a skipped branch), so every adapter parameter gets a gradient on
every rank and the default ``find_unused_parameters=False`` works. Save from one rank:
``model.save_pretrained(dir)`` on rank 0 (the DDP replicas are identical).
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lyco


def base_model() -> nn.Module:
    torch.manual_seed(0)  # the same base weights on every rank
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("lyco_ddp_out"))
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    train(args, rank, world, device)
    gc.collect()  # DDP's reducer dies before its process group does (teardown order matters for gloo)
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    use_cuda = device.type == "cuda"
    config = lyco.LoHaConfig(r=4, alpha=4, target_modules=["0", "2"], module_dropout=0.1, rank_dropout=0.1)
    model = lyco.get_model(base_model(), config).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)

    g = torch.Generator().manual_seed(1)  # one global dataset; each rank takes its slice of every batch
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)
    per_rank = x.shape[0] // world
    xs, ys = x[rank * per_rank: (rank + 1) * per_rank].to(device), y[rank * per_rank: (rank + 1) * per_rank].to(device)
    torch.manual_seed(100 + rank)  # different dropout draws per rank
    for step in range(args.steps):
        loss = nn.functional.cross_entropy(ddp(xs), ys)
        loss.backward()  # gradients are averaged across ranks here
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}")

    if rank == 0:
        model.save_pretrained(args.out)  # the unwrapped LycoModel; all replicas hold the same weights
        print(f"saved adapter to {args.out}")


if __name__ == "__main__":
    main()
