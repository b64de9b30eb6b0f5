"""Distributed training on CPU (gloo, 2 processes via torch.multiprocessing.spawn): DDP and FSDP2.

- DDP: adapter parameters after N steps equal single-process training on the same global batch (1e-5);
  module/rank dropout with the default ``find_unused_parameters=False`` raises nothing and the replicas
  stay identical.
- FSDP2 (``fully_shard`` per block + root): training equals single-process training as well; the sharded
  adapter saves through ``save_pretrained`` (gathered, rank 0 writes) and reloads into a plain model with
  the same outputs; merging a sharded model raises a :class:`lyco.MergeError` that says how to gather,
  adding/loading an adapter after ``fully_shard`` a :class:`lyco.StateError`;
  bf16 compute through ``MixedPrecisionPolicy`` keeps fp32 sharded adapter weights and tracks fp32 training.

Each spawn writes what it measured to ``tmp_path``; the assertions run in the test process.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lyco

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
]
WORLD = 2
STEPS = 4
LR = 0.2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.view(x.shape[0], 4, 4)).flatten(1)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def base_net() -> Net:
    torch.manual_seed(0)
    return Net()


def build(**dropout) -> lyco.LycoModel:
    """Same weights everywhere: LoHa on fc1 (+ the conv, CP), LoKr on fc2, both active; head trained fully."""
    model = lyco.get_model(
        base_net(), lyco.LoHaConfig(r=4, target_modules=["fc1", "conv"], init_weights=False, use_effective_conv2d=True,
                               modules_to_save=["head"], **dropout),
    )  # fmt: skip
    model.add_adapter("kr", lyco.LoKrConfig(r=2, target_modules=["fc2"], init_weights=False, decompose_both=True, **dropout))
    model.set_adapter(["default", "kr"])
    return model


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 16, generator=g), torch.randint(0, 3, (8,), generator=g)


def train(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def trainable(model: lyco.LycoModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference() -> tuple[dict[str, torch.Tensor], list[float]]:
    """Single process, whole global batch."""
    model = build()
    x, y = global_batch()
    losses = train(model, [p for p in model.parameters() if p.requires_grad], x, y)
    return trainable(model), losses


def spawn(worker, tmp, timeout: float = 180.0) -> None:
    """``mp.spawn`` that fails (and kills the workers) instead of hanging when a collective deadlocks."""
    ctx = mp.spawn(worker, args=(str(tmp),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed workers still running after {timeout:.0f} s")


def _run(run, rank: int, tmp: str) -> None:
    """Process group around ``run(rank, tmp)``; DDP/FSDP objects die (inside ``run``) before the group does:
    destroying a DDP reducer after its gloo group hangs now and then."""
    faulthandler.dump_traceback_later(60, exit=True)  # a deadlock shows where it waits, then fails
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        run(rank, tmp)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank: int, tmp: str) -> None:
    _run(_ddp, rank, tmp)


def _ddp(rank: int, tmp: str) -> None:
    x, y = global_batch()
    shard = slice(rank * 4, rank * 4 + 4)
    model = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    losses = train(ddp, [p for p in ddp.parameters() if p.requires_grad], x[shard], y[shard])
    # module + rank dropout, different draws per rank, default find_unused_parameters=False
    dropped = build(module_dropout=0.5, rank_dropout=0.3)
    dropped.train()
    torch.manual_seed(100 + rank)
    ddp2 = nn.parallel.DistributedDataParallel(dropped)
    train(ddp2, [p for p in ddp2.parameters() if p.requires_grad], x[shard], y[shard])
    torch.save({"params": trainable(model), "losses": losses, "dropout_params": trainable(dropped)},
               f"{tmp}/ddp{rank}.pt")  # fmt: skip


def test_ddp_equals_single_process_and_tolerates_module_dropout(tmp_path):
    spawn(_ddp_worker, tmp_path)
    want, _ = reference()
    results = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    for res in results:
        assert res["params"].keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(res["params"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    start = trainable(build())
    assert any(not torch.equal(want[n], start[n]) for n in want)  # training really moved the adapters
    for name, value in results[0]["dropout_params"].items():  # replicas stay in sync with dropout
        torch.testing.assert_close(results[1]["dropout_params"][name], value, rtol=0, atol=0, msg=name)


def _fsdp_worker(rank: int, tmp: str) -> None:
    _run(_fsdp, rank, tmp)


def _fsdp(rank: int, tmp: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    x, y = global_batch()
    model = build()
    for block in model.model.blocks:
        fully_shard(block)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert type(params[0]).__name__ == "DTensor"
    losses = train(model, params, x[rank * 4: rank * 4 + 4], y[rank * 4: rank * 4 + 4])
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.save_pretrained(f"{tmp}/adapter")  # every rank; rank 0 writes the gathered adapter
    errors = {}
    for action in ("merge_adapter", "merge_and_unload"):
        try:
            getattr(model, action)()
        except lyco.MergeError as exc:
            errors[action] = str(exc)
    for action, call in (("add_adapter", lambda: model.add_adapter("late", lyco.LoHaConfig(target_modules=["fc2"]))),
                         ("load_adapter", lambda: model.load_adapter(f"{tmp}/adapter/kr", "late"))):  # fmt: skip
        try:
            call()
        except lyco.StateError as exc:
            errors[action] = str(exc)
    reloaded = lyco.LycoModel.from_pretrained(base_net(), f"{tmp}/adapter")
    reloaded.load_adapter(f"{tmp}/adapter/kr", "kr")
    reloaded.set_adapter(["default", "kr"])
    with torch.no_grad():
        reloaded_out = reloaded(x)
    # bf16 compute (FSDP2 MixedPrecisionPolicy) with fp32 sharded master adapter weights
    mixed = build()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in mixed.model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(mixed, mp_policy=policy)
    mixed_params = [p for p in mixed.parameters() if p.requires_grad]
    mixed_losses = train(mixed, mixed_params, x[rank * 4: rank * 4 + 4], y[rank * 4: rank * 4 + 4])
    torch.save({"out": out, "reloaded_out": reloaded_out, "errors": errors, "losses": losses,
                "mixed_losses": mixed_losses, "mixed_dtypes": sorted({str(p.dtype) for p in mixed_params}),
                "files": sorted(os.listdir(f"{tmp}/adapter"))}, f"{tmp}/fsdp{rank}.pt")  # fmt: skip


def test_fsdp2_trains_saves_gathered_and_refuses_merge(tmp_path):
    spawn(_fsdp_worker, tmp_path)
    want, want_losses = reference()
    results = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(WORLD)]
    assert results[0]["files"] == ["adapter_config.json", "adapter_model.safetensors", "kr"]
    # the saved (gathered) adapter is the single-process result
    saved = lyco.LycoModel.from_pretrained(base_net(), tmp_path / "adapter")
    saved.load_adapter(tmp_path / "adapter" / "kr", "kr")
    got = {n: p for n, p in saved.named_parameters() if "lyco_adapters" in n or "modules_to_save" in n}
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for res in results:
        torch.testing.assert_close(res["reloaded_out"], res["out"], rtol=1e-6, atol=1e-6)
        assert sorted(res["errors"]) == ["add_adapter", "load_adapter", "merge_adapter", "merge_and_unload"]
        assert all("FSDP2" in e and "from_pretrained" in e for e in res["errors"].values())
        assert "then call fully_shard" in res["errors"]["add_adapter"]
        assert res["mixed_dtypes"] == ["torch.float32"]  # bf16 compute, fp32 master adapter shards
        torch.testing.assert_close(torch.tensor(res["mixed_losses"]), torch.tensor(res["losses"]), rtol=5e-2, atol=2e-2)
    # per-rank loss is on its half of the batch: their mean is the single-process loss
    mean_losses = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[1]["losses"], strict=True)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    assert want_losses[-1] < want_losses[0]
