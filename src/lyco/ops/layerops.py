"""Apply a weight to an input the way the base layer would — the one place layer types differ.

Supported base layers: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and transformers' GPT-2 style
``Conv1D`` (a linear layer that stores its weight transposed, ``(in, out)``). Every adapter works
on the *canonical* weight layout ``(out, in_per_group, *kernel)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter needs to know about a base layer.

    ``kind``: ``"linear"``, ``"conv"`` or ``"conv1d_t"`` (transformers ``Conv1D``, weight ``(in, out)``);
    ``in_features`` is per group for grouped convs (``groups``); ``has_bias``: the layer has a bias.
    """

    kind: str
    out_features: int
    in_features: int
    kernel: Shape
    groups: int = 1
    has_bias: bool = False

    @property
    def weight_shape(self) -> Shape:
        """Canonical delta shape ``(out, in, *kernel)``."""
        return (self.out_features, self.in_features, *self.kernel)

    def channel_dim(self, ndim: int) -> int:
        """Dimension of an output with ``ndim`` dims that holds the ``out`` channels (conv may be unbatched)."""
        return ndim - len(self.kernel) - 1 if self.kind == "conv" else ndim - 1


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), torch.Tensor
    )


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The :class:`LayerSpec` of a supported layer, ``None`` for any other module."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.out_features, module.in_features, (), has_bias=bias)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        out, in_, *k = module.weight.shape
        return LayerSpec("conv", out, in_, tuple(k), module.groups, bias)
    if _is_hf_conv1d(module):
        in_, out = module.weight.shape
        return LayerSpec("conv1d_t", out, in_, (), has_bias=bias)
    return None


SUPPORTED_LAYERS = "nn.Linear, nn.Conv1d, nn.Conv2d, transformers Conv1D"


def apply_weight(
    module: nn.Module, spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``module``'s operation with ``weight`` (canonical layout) instead of its own, plus ``bias`` if given.

    Linear: ``x (..., in) → (..., out)``; conv: ``x (N, C_in, *spatial) → (N, out, *spatial')`` with the
    module's stride, padding (incl. ``padding_mode``), dilation and groups.
    """
    if spec.kind == "conv":
        return module._conv_forward(x, weight, bias)  # type: ignore[operator]
    return F.linear(x, weight, bias)


def from_canonical(spec: LayerSpec, delta: torch.Tensor) -> torch.Tensor:
    """A canonical delta laid out like the base layer's stored weight."""
    return delta.mT if spec.kind == "conv1d_t" else delta
