"""Plain LoRA as it appears in kohya / LyCORIS files (``lora_down.weight``, ``lora_up.weight``): read for
``inspect``, ``merge``, ``convert`` and ``resize``, written by ``to-lora`` and ``extract --algo lora``.

``ΔW = lora_up (out, r, 1…) @ lora_down (r, in, *k) · alpha / r``. A file-only method for now: lyco
models cannot hold LoRA adapters yet, so loading such a file into a model is a :class:`~lyco.FormatError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..ops.lowrank import lora_delta, lora_factors, svd_factors
from .registry import register_method
from .schema import FitOptions, MethodSchema, Param, Shape


@register_method
class LoRAFile(MethodSchema):
    """kohya's ``networks.lora`` module tensors (LyCORIS ``locon`` without a Tucker core)."""

    algo = "lora"
    title = "plain LoRA"
    params = (Param("lora_down", min_ndim=2, key="lora_down.weight"), Param("lora_up", min_ndim=2, key="lora_up.weight"))

    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int:
        return int(shapes["lora_down"][0])

    @classmethod
    def guess_weight_shape(cls, shapes: Mapping[str, Shape]) -> Shape:
        """``(out, in, *k)``: ``lora_down`` keeps a conv kernel in its trailing dims."""
        return (shapes["lora_up"][0], *shapes["lora_down"][1:])

    @classmethod
    def compose(cls, tensors: Mapping[str, torch.Tensor], plan: object) -> torch.Tensor:
        return lora_delta(tensors["lora_up"], tensors["lora_down"])

    @classmethod
    def matvec(cls, tensors, plan, v):
        return tensors["lora_up"].flatten(1) @ (tensors["lora_down"].flatten(1) @ v)

    @classmethod
    def extract(cls, delta: torch.Tensor, opts: FitOptions) -> dict[str, torch.Tensor]:
        """The rank-``r`` truncated SVD of ``delta`` (the best rank-``r`` approximation)."""
        return lora_factors(delta, opts.rank)

    @classmethod
    def resize(cls, tensors, plan, opts: FitOptions) -> dict[str, torch.Tensor]:
        """The truncated SVD of ``lora_up @ lora_down`` without building it: QR of both factors, then the SVD
        of the small ``(r, r)`` core; kernel layouts kept."""
        down, up = tensors["lora_down"], tensors["lora_up"]
        q_up, r_up = torch.linalg.qr(up.flatten(1))
        q_down, r_down = torch.linalg.qr(down.flatten(1).T)
        a, b = svd_factors(r_up @ r_down.T, opts.rank)
        a, b = q_up @ a, b @ q_down.T
        return {
            "lora_down": b.reshape(b.shape[0], *down.shape[1:]),
            "lora_up": a.reshape(a.shape[0], a.shape[1], *[1] * (down.dim() - 2)),
        }

