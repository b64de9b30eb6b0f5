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
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats.adapterfile import AdapterFile, ModuleAdapter
from ..formats.convert import guess_weight_shape
from ..ops.factorize import infer_loha_plan, infer_lokr_plan
from ..ops.lowrank import relative_error, svd_factors
from ..ops.tucker import cp_rebuild
from . import ModuleResult, Progress, track
from .fit import LOHA_STEPS, fit_loha


def _branch(t: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    """LoHa branch ``i`` (1 or 2) as a matrix ``(out, in·∏k)``."""
    if f"hada_t{i}" in t:
        return cp_rebuild(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]).flatten(1)
    return t[f"hada_w{i}_a"] @ t[f"hada_w{i}_b"]


def resize_module(
    m: ModuleAdapter, rank: int, steps: int = LOHA_STEPS, seed: int = 0
) -> tuple[ModuleAdapter, str]:
    """``m`` re-factored at ``rank`` (same algorithm, same scale) and a note on what was done."""
    shape = guess_weight_shape(m)
    t = {k: v.detach().double() for k, v in m.tensors.items()}
    old = m.rank
    if old is None:
        return m, "both LoKr factors full: nothing to resize"
    if rank >= old:
        return m, f"rank {old} ≤ {rank}: unchanged"
    new: dict[str, torch.Tensor] = {}
    if m.algo == "lora":
        up = t["lora_up"].flatten(1)
        a, b = svd_factors(up @ t["lora_down"].flatten(1), rank)
        kernel = t["lora_down"].shape[2:]
        new["lora_down"] = b.reshape(b.shape[0], *t["lora_down"].shape[1:])
        new["lora_up"] = a.reshape(a.shape[0], a.shape[1], *[1] * len(kernel))
    elif m.algo == "lokr":
        plan = infer_lokr_plan({k: tuple(v.shape) for k, v in t.items()}, shape)
        if plan.use_w1:
            new["lokr_w1"] = t["lokr_w1"].float()
        else:
            new["lokr_w1_a"], new["lokr_w1_b"] = svd_factors(t["lokr_w1_a"] @ t["lokr_w1_b"], rank, pad=True)
        if plan.use_w2:
            new["lokr_w2"] = t["lokr_w2"].float()
        else:
            w2 = cp_rebuild(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]) if plan.use_cp else None
            w2 = w2.flatten(1) if w2 is not None else t["lokr_w2_a"] @ t["lokr_w2_b"]
            new["lokr_w2_a"], new["lokr_w2_b"] = svd_factors(w2, rank, pad=True)
    else:
        infer_loha_plan({k: tuple(v.shape) for k, v in t.items()}, shape)
        b1, b2 = _branch(t, 1), _branch(t, 2)
        init = {}
        init["hada_w1_a"], init["hada_w1_b"] = svd_factors(b1, rank, pad=True)
        init["hada_w2_a"], init["hada_w2_b"] = svd_factors(b2, rank, pad=True)
        new, _ = fit_loha(b1 * b2, rank, steps=steps, seed=seed, init=init)
    dtype = next(iter(m.tensors.values())).dtype
    resized = ModuleAdapter(m.algo, {k: v.to(dtype).contiguous() for k, v in new.items()}, weight_shape=tuple(shape))
    if m.alpha is not None:  # keep the scale: alpha' / r' = alpha / r
        resized.alpha = m.scale() * resized.rank
    return resized, f"rank {old} → {resized.rank}"


def to_lora_module(m: ModuleAdapter, rank: int) -> ModuleAdapter:
    """Plain LoRA (kohya layout, alpha = r) with the best rank-``rank`` approximation of ``m``'s scaled ``ΔW``."""
    shape = guess_weight_shape(m)
    delta = m.delta_weight(shape).double()
    out_f, in_f, *kernel = shape
    up, down = svd_factors(delta.reshape(out_f, -1), rank)
    k, dtype = up.shape[1], next(iter(m.tensors.values())).dtype
    tensors = {
        "lora_down": down.reshape(k, in_f, *kernel).to(dtype).contiguous(),
        "lora_up": up.reshape(out_f, k, *[1] * len(kernel)).to(dtype).contiguous(),
    }
    return ModuleAdapter("lora", tensors, alpha=float(k), weight_shape=tuple(shape))


def _run(af: AdapterFile, convert, progress: Progress | None, desc: str) -> tuple[AdapterFile, list[ModuleResult]]:
    modules: dict[str, ModuleAdapter] = {}
    results: list[ModuleResult] = []
    for name, m in track(sorted(af.modules.items()), progress, len(af.modules), desc):
        shape = guess_weight_shape(m)
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
    return _run(af, lambda m: resize_module(m, rank, steps, seed), progress, "resize")


def to_lora(af: AdapterFile, rank: int, progress: Progress | None = None) -> tuple[AdapterFile, list[ModuleResult]]:
    """Every module as a plain rank-``rank`` LoRA; per module the relative error of the SVD truncation."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    out, results = _run(af, lambda m: (to_lora_module(m, rank), ""), progress, "to-lora")
    metadata = {k: v for k, v in af.metadata.items() if k not in ("ss_network_module", "ss_network_args")}
    metadata.update(ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(rank))
    return dataclasses.replace(out, metadata=metadata), results
