"""``lyco resize`` and ``lyco to-lora``: re-factor an adapter's low-rank parts at another rank by SVD.

Every module keeps its scale: the new alpha is ``old scale · new r`` (alpha stays absent when it was),
so ``delta_weight()`` changes only by the truncation. Ranks at or above a module's current rank leave
it unchanged (a larger rank would only add zero components).

- LoRA: SVD of ``lora_up @ lora_down``.
- LoKr: SVD of the products ``w1_a @ w1_b`` and ``w2_a @ w2_b`` (a CP ``w2`` is rebuilt and re-factored
  as a plain ``w2_a @ w2_b``); full factors stay full.
- LoHa: each branch's product truncated by SVD as the start, then the same seeded Adam fit as
  ``extract`` on the whole Hadamard product (rank ``r`` LoHa reaches rank ``r²``; branch-wise SVD alone
  is not optimal). CP branches come out as plain ``w_a @ w_b``.
- to-lora: the rank-``r`` SVD of each module's full scaled ``ΔW`` as kohya ``lora_down (r, in, *k)``,
  ``lora_up (out, r, 1…)`` with alpha = r.

A DoRA module keeps its magnitude ``dora_scale`` (a LoHa/LoKr DoRA module becomes LoRA + DoRA).
"""

from __future__ import annotations

import dataclasses

from ..formats.adapterfile import AdapterFile, ModuleAdapter
from ..formats.metadata import ARGS, without_ranks
from ..methods.lora import LoRAAdapter
from ..methods.schema import DORA, FitOptions
from ..ops.hadamard import LOHA_STEPS
from ..ops.lowrank import relative_error
from . import ModuleResult, Progress, track


def resize_module(
    m: ModuleAdapter, rank: int, steps: int = LOHA_STEPS, seed: int = 0
) -> tuple[ModuleAdapter, str]:
    """``m`` re-factored at ``rank`` by its method's ``resize`` hook (same method, same scale) and a note."""
    old = m.rank
    if old is None:
        return m, f"{m.method.unranked}: nothing to resize"
    if rank >= old:
        return m, f"rank {old} ≤ {rank}: unchanged"
    shape = m.guess_weight_shape()
    t = {k: v.detach().double() for k, v in m.tensors.items()}
    new = m.method.resize(t, m.method.infer_plan(m.shapes(), shape), FitOptions(rank, steps=steps, seed=seed))
    dtype = next(iter(m.tensors.values())).dtype
    resized = ModuleAdapter(m.algo, {k: v.to(dtype).contiguous() for k, v in new.items()}, weight_shape=tuple(shape))
    if m.alpha is not None:  # keep the scale: alpha' / r' = alpha / r
        resized.alpha = m.scale() * resized.rank
    return _keep_dora(m, resized), f"rank {old} → {resized.rank}" + ("; DoRA magnitude kept" if m.dora is not None else "")


def _keep_dora(src: ModuleAdapter, new: ModuleAdapter) -> ModuleAdapter:
    """``new`` with ``src``'s DoRA magnitude (the norm it divides by follows the re-factored ``ΔW``)."""
    if src.dora is not None:
        new.tensors[DORA.name] = src.dora
    return new


def to_lora_module(m: ModuleAdapter, rank: int) -> ModuleAdapter:
    """Plain LoRA (kohya layout, alpha = r) with the best rank-``rank`` approximation of ``m``'s scaled ``ΔW``."""
    shape = m.guess_weight_shape()
    dtype = next(iter(m.tensors.values())).dtype
    tensors = LoRAAdapter.extract(m.delta_weight(shape).double(), FitOptions(rank))
    lora = ModuleAdapter(LoRAAdapter.algo, {k: v.to(dtype).contiguous() for k, v in tensors.items()}, weight_shape=shape)
    lora.alpha = float(lora.rank)
    return _keep_dora(m, lora)  # LoRA + DoRA


def _lost_bias(m: ModuleAdapter) -> str:
    """The note for a module whose bias delta a LoRA cannot carry (Full's ``diff_b``)."""
    db = m.delta_bias()
    return "" if db is None else f"bias delta dropped (max |Δb| {float(db.abs().max()):.2e}): LoRA has none"


def _run(af: AdapterFile, convert, progress: Progress | None, desc: str) -> tuple[AdapterFile, list[ModuleResult]]:
    modules: dict[str, ModuleAdapter] = {}
    results: list[ModuleResult] = []
    for name, m in track(sorted(af.modules.items()), progress, len(af.modules), desc):
        shape = m.guess_weight_shape()
        new, note = convert(m)
        modules[name] = new
        err = relative_error(m.delta_weight(shape).double(), new.delta_weight(shape).double())
        results.append(ModuleResult(name, new.algo, tuple(shape), new.rank, err, new.num_params(), note))
    return dataclasses.replace(af, modules=modules), results


def resize_adapter(
    af: AdapterFile, rank: int, steps: int = LOHA_STEPS, seed: int = 0, progress: Progress | None = None
) -> tuple[AdapterFile, list[ModuleResult]]:
    """Every module re-factored at ``rank`` (see the module docstring); per module the relative error."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    out, results = _run(af, lambda m: resize_module(m, rank, steps, seed), progress, "resize")
    return dataclasses.replace(out, metadata=without_ranks(af.metadata)), results  # the writer states the new ranks


def to_lora(af: AdapterFile, rank: int, progress: Progress | None = None) -> tuple[AdapterFile, list[ModuleResult]]:
    """Every module as a plain rank-``rank`` LoRA; per module the relative error of the SVD truncation."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    out, results = _run(af, lambda m: (to_lora_module(m, rank), _lost_bias(m)), progress, "to-lora")
    metadata = {k: v for k, v in without_ranks(af.metadata).items() if k not in ("ss_network_module", ARGS)}
    metadata.update(ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(rank))
    return dataclasses.replace(out, metadata=metadata), results
