"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): detection and gathering.

Between forward passes the parameters of a ``fully_shard``-ed module are ``DTensor`` shards (each rank
holds a slice); inside a forward, or after one on the root module, they are temporary unsharded copies
whose changes are not written back to the shards. So lyco

- gathers adapter weights for :meth:`LycoModel.save_pretrained` (a collective: every rank must call it;
  rank 0 writes), and
- refuses to merge/unmerge into sharded base weights (:func:`check_unsharded`): merge on an unsharded
  copy instead (save, then ``LycoModel.from_pretrained(base, dir).merge_and_unload()``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .errors import MergeError, StateError


def _types() -> tuple[type | None, type | None]:
    """``(FSDPModule, DTensor)`` when their modules are loaded, else ``None`` each: a model can only be sharded
    by code that imported them, so lyco never imports ``torch.distributed`` itself (0.6 s of ``import lyco``)."""
    fsdp, tensor = sys.modules.get("torch.distributed.fsdp"), sys.modules.get("torch.distributed.tensor")
    return getattr(fsdp, "FSDPModule", None), getattr(tensor, "DTensor", None)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every submodule (``model`` included) that ``fully_shard`` was applied to."""
    fsdp_module, _ = _types()
    if fsdp_module is None:
        return []
    return [m for m in model.modules() if isinstance(m, fsdp_module)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is (partly) sharded by FSDP2 or holds ``DTensor`` parameters."""
    _, dtensor = _types()
    if dtensor is None:
        return bool(fsdp_modules(model))
    return bool(fsdp_modules(model)) or any(isinstance(p, dtensor) for p in model.parameters())


def check_unsharded(model: nn.Module, action: str) -> None:
    """Raise :class:`MergeError` if ``model`` is sharded: ``action`` would only change one rank's shard
    (or a temporary unsharded copy that FSDP throws away)."""
    if is_sharded(model):
        raise MergeError(
            f"cannot {action} a model sharded with FSDP2 (fully_shard): each rank holds only a shard of the "
            "base weights. Gather first: call model.save_pretrained(dir) on every rank (rank 0 writes the "
            "full adapter), then on one process load it into an unsharded base model and merge there: "
            "lyco.LycoModel.from_pretrained(base_model, dir).merge_and_unload()"
        )


def check_not_sharded_for_adapters(model: nn.Module) -> None:
    """Raise :class:`StateError` if ``model`` is sharded: FSDP2 manages the parameters it saw at
    ``fully_shard`` time, so adapters added (or loaded) afterwards would never be sharded or synchronised."""
    if is_sharded(model):
        raise StateError(
            "cannot add or load an adapter on a model sharded with FSDP2 (fully_shard): FSDP only manages the "
            "parameters that existed when it sharded the model. Add/load every adapter first "
            "(lyco.get_model, add_adapter, load_adapter, LycoModel.from_pretrained), then call fully_shard"
        )


@contextlib.contextmanager
def full_weights(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[None]:
    """Collective (every rank, same ``modules`` order): inside the context the ``DTensor`` parameters and
    buffers of ``modules`` are replaced by their full (all-gathered) tensors; restored on exit.

    The FSDP2 modules of ``model`` are resharded first, so every parameter is its sharded ``DTensor``.
    """
    for m in fsdp_modules(model):
        m.reshard()
    _, dtensor = _types()
    swapped: list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]] = []
    try:
        for module in modules:
            for table in (module._parameters, module._buffers):
                for name, t in list(table.items()):
                    if dtensor is not None and isinstance(t, dtensor):
                        full = t.full_tensor().detach()
                        table[name] = nn.Parameter(full, requires_grad=False) if isinstance(t, nn.Parameter) else full
                        swapped.append((table, name, t))
        yield
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t
