"""``lyco extract``: an adapter approximating ``tuned − base``, module by module, by the method's own
``extract`` hook (:meth:`lyco.methods.schema.MethodSchema.extract`).

LoKr: the nearest Kronecker product ``kron(w1, w2)`` of ``ΔW`` (Van Loan–Pitsianis: a rank-1 SVD of
the rearranged matrix, optimal in the Frobenius norm), then rank-``r`` SVD factors for the parts that
lyco's plan rules make low-rank (:func:`lyco.ops.factorize.plan_lokr`: ``w2`` is full when
``r ≥ max(out_r, in_r)/2``, ``w1`` unless ``decompose_both``). LoHa has no closed form: a short seeded
Adam fit (:func:`lyco.ops.hadamard.fit_loha`). LoRA: the truncated SVD. Full: the difference itself, and
the module's bias difference (``diff_b``, where ``<module>.bias`` differs; a module is extracted when its
weight differs). Files are streamed (one
base/tuned tensor pair at a time). The file's ``ss_*`` metadata states what was asked for (``--rank``,
``--factor``…), as kohya's extraction scripts write it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import FormatError
from ..formats.adapterfile import AdapterFile, ModuleAdapter
from ..formats.metadata import NETWORK_MODULE
from ..formats.names import BIAS, WEIGHT
from ..formats.stream import DTYPES, read_index
from ..methods.registry import all_methods, method_for_algo
from ..methods.schema import FitOptions
from ..ops.hadamard import LOHA_STEPS
from ..ops.lowrank import relative_error
from . import ModuleResult, Progress, track


def extract_algos() -> list[str]:
    """The methods ``extract`` can produce (those with an ``extract`` hook)."""
    return [m.algo for m in all_methods() if m.implements("extract")]


def extract_module(
    delta: torch.Tensor,
    algo: str,
    rank: int,
    factor: int = -1,
    decompose_both: bool = False,
    steps: int = LOHA_STEPS,
    seed: int = 0,
    bias_delta: torch.Tensor | None = None,
) -> ModuleAdapter:
    """A module adapter (alpha = its rank, so scale 1; fp32 CPU tensors) whose ``delta_weight()``
    approximates ``delta (out, in, *k)`` (and, for a method with a bias delta, whose ``delta_bias()`` is
    ``bias_delta (out,)``); the maths runs on ``delta``'s device."""
    method = method_for_algo(algo)
    if not method.implements("extract"):
        raise FormatError(f"extract supports {', '.join(extract_algos())}, not {algo!r}")
    opts = FitOptions(rank, factor, decompose_both, steps, seed)
    found = method.extract(delta, opts)
    if bias_delta is not None:
        found.update(method.extract_bias(bias_delta))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in found.items()}
    m = ModuleAdapter(algo, tensors, weight_shape=tuple(delta.shape))
    m.alpha = float(m.rank or rank)
    return m


def candidate_keys(
    base_specs: dict, tuned_specs: dict, include: str | None = None, exclude: str | None = None
) -> list[str]:
    """``<module>.weight`` keys in both files with equal shape, ≥ 2 dims and a float dtype, filtered by
    ``include``/``exclude`` regexes (``re.search`` on the module path)."""
    keys = []
    for key, (dtype, shape) in tuned_specs.items():
        if not key.endswith(WEIGHT) or key not in base_specs or len(shape) < 2:
            continue
        if base_specs[key][1] != shape or not getattr(DTYPES.get(dtype), "is_floating_point", False):
            continue
        module = key[: -len(WEIGHT)]
        if include and not re.search(include, module):
            continue
        if exclude and re.search(exclude, module):
            continue
        keys.append(key)
    return keys


def extract_files(
    base_path: str | os.PathLike,
    tuned_path: str | os.PathLike,
    algo: str,
    rank: int,
    factor: int = -1,
    decompose_both: bool = False,
    steps: int = LOHA_STEPS,
    seed: int = 0,
    include: str | None = None,
    exclude: str | None = None,
    min_diff: float = 0.0,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> tuple[AdapterFile, list[ModuleResult]]:
    """Extract an adapter from two safetensors state dicts (``base``, ``tuned``).

    Modules whose weights are equal, or whose ``‖ΔW‖/‖W‖ ≤ min_diff``, are skipped. The SVDs and fits
    run on ``device`` (a GPU makes LoHa fits and large SVDs much faster). Returns the
    adapter (``lycoris`` convention, ``ss_*`` metadata) and per module the relative error of the
    adapter's own ``delta_weight()`` against the true difference.
    """
    if rank < 1:
        raise FormatError(f"--rank must be positive, got {rank}")
    base_specs, _ = read_index(base_path)
    tuned_specs, _ = read_index(tuned_path)
    keys = candidate_keys(base_specs, tuned_specs, include, exclude)
    modules: dict[str, ModuleAdapter] = {}
    results: list[ModuleResult] = []
    takes_bias = method_for_algo(algo).implements("extract_bias")
    with safe_open(str(base_path), framework="pt") as fb, safe_open(str(tuned_path), framework="pt") as ft:

        def bias_delta(module: str) -> torch.Tensor | None:
            """``tuned − base`` of ``<module>.bias`` for a method that carries one, where it differs."""
            key = module + BIAS
            if not takes_bias or key not in base_specs or tuned_specs.get(key) != base_specs[key]:
                return None
            b0, b1 = fb.get_tensor(key).to(device, torch.float64), ft.get_tensor(key).to(device, torch.float64)
            return None if torch.equal(b0, b1) else b1 - b0

        for key in track(keys, progress, len(keys), f"extract {algo}"):
            w0, w1 = fb.get_tensor(key).to(device, torch.float64), ft.get_tensor(key).to(device, torch.float64)
            delta = w1 - w0
            if torch.equal(w0, w1) or float(delta.norm()) <= min_diff * float(w0.norm()):
                continue
            del w0, w1
            name = key[: -len(WEIGHT)]
            m = extract_module(delta, algo, rank, factor, decompose_both, steps, seed, bias_delta(name))
            modules[name] = m
            err = relative_error(delta.cpu(), m.delta_weight().double())
            results.append(ModuleResult(name, algo, tuple(delta.shape), m.rank, err, m.num_params()))
    if not modules:
        raise FormatError(f"{tuned_path}: no weight differs from {base_path}; nothing to extract")
    args = {"algo": algo, "factor": str(factor), "decompose_both": str(decompose_both)}
    metadata = {
        "ss_network_module": NETWORK_MODULE, "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        "ss_network_args": json.dumps(args), "lyco_extracted_from": f"{Path(base_path).name} → {Path(tuned_path).name}",
    }  # fmt: skip
    return AdapterFile(modules, convention="lycoris", metadata=metadata), results
