"""A kohya sd-scripts network module on lyco's adapters: ``--network_module lyco.kohya`` where one wrote
``--network_module lycoris.kohya``, with the same ``--network_args`` (``algo=lokr``, ``factor=8``, ``conv_dim=4``,
``preset=attn-mlp``, ``dora_wd=True``, ``loraplus_lr_ratio=4``…).

sd-scripts calls, in its order: :func:`create_network` (or :func:`create_network_from_weights` with
``--dim_from_weights`` / ``--base_weights``), ``apply_to(text_encoder, unet, train_te, train_unet)``,
``load_weights``, ``enable_gradient_checkpointing``, ``prepare_optimizer_params(te_lr, unet_lr, lr)``,
``prepare_grad_etc``, ``on_epoch_start`` / ``on_step_start``, ``get_trainable_params``,
``apply_max_norm_regularization``, ``set_multiplier``, ``save_weights``; ``is_mergeable`` / ``merge_to`` for
``--base_weights`` and generation. Files carry lycoris-lora's keys (``lora_unet_…``, ``lora_te_…`` /
``lora_te1_…``), shapes and the ``ss_*`` metadata sd-scripts passes (``ss_network_module`` written as
``lycoris.kohya``, so consumers classify the file as LyCORIS's). Targets: the preset's ``unet_target_module`` /
``unet_target_name`` and ``text_encoder_target_module`` / ``text_encoder_target_name`` (the built-in ``full`` by
default, as lycoris-lora).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import ArgumentError
from .lycoris_config import Preset, load_preset
from .network import ADAPTER, LycorisNetwork, Root, from_weights, read_weights

__all__ = ["LycorisNetworkKohya", "create_network", "create_network_from_weights"]

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"


def _text_encoders(text_encoder: Any) -> list[tuple[str, nn.Module]]:
    """``(prefix, module)`` per text encoder: ``lora_te`` for one, ``lora_te1``, ``lora_te2``… for a list (kohya)."""
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [(f"{TE_PREFIX}{i + 1}", te) for i, te in enumerate(text_encoder) if te is not None]
    return [(TE_PREFIX, text_encoder)]


def _ratio(value: Any) -> float | None:
    return None if value is None else float(value)


class LycorisNetworkKohya(LycorisNetwork):
    """lycoris-lora's ``LycorisNetworkKohya`` on lyco's adapters: text encoder(s) and UNet (or DiT) as roots."""

    preset: ClassVar[Preset] = Preset().updated(load_preset("full"))

    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None

    def __init__(self, text_encoder: Any, unet: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__((text_encoder, unet), *args, **kwargs)

    def targets(self, module: Any) -> list[tuple[str, nn.Module, str, tuple[str, ...] | None, tuple[str, ...] | None]]:
        text_encoder, unet = module
        if not isinstance(unet, nn.Module):
            raise ArgumentError(f"create_network needs the UNet (or DiT) module, got {type(unet).__name__}")
        p = self.network_preset
        roots: list[tuple[str, nn.Module, str, tuple[str, ...] | None, tuple[str, ...] | None]] = [
            (prefix, te, "te", p.text_encoder_target_module, p.text_encoder_target_name)
            for prefix, te in _text_encoders(text_encoder)
        ]
        unet_classes = tuple(c for c in p.unet_target_module if c != "LLMAdapterTransformerBlock")
        return [*roots, (UNET_PREFIX, unet, "unet", unet_classes, p.unet_target_name)]

    @property
    def text_encoder_loras(self) -> list[nn.Module]:
        return [layer.lyco_adapters[ADAPTER] for root in self.roots if root.kind == "te" for layer in root.layers.values()]

    @property
    def unet_loras(self) -> list[nn.Module]:
        return [layer.lyco_adapters[ADAPTER] for root in self.roots if root.kind == "unet" for layer in root.layers.values()]

    def _keep(self, text_encoder: bool, unet: bool) -> None:
        """Drop the roots sd-scripts does not train (their adapters leave the network)."""
        kept: list[Root] = []
        for root in self.roots:
            if (root.kind == "te" and text_encoder) or (root.kind == "unet" and unet):
                kept.append(root)
                continue
            root.install(False)
            for name in root.names.values():
                delattr(self, name)
        self.roots = kept

    def apply_to(  # type: ignore[override]
        self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool | None = None,
        apply_unet: bool | None = None,
    ) -> None:  # fmt: skip
        """Keep the text-encoder / UNet adapters sd-scripts trains and put their layers into the models."""
        if apply_text_encoder is None or apply_unet is None:
            raise ArgumentError("apply_to(text_encoder, unet, apply_text_encoder, apply_unet): give both flags")
        self._keep(bool(apply_text_encoder), bool(apply_unet))
        super().apply_to()

    def merge_to(  # type: ignore[override]
        self, text_encoder: Any = None, unet: Any = None, weights_sd: Mapping[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None, device: Any = None, **_: Any,
    ) -> None:  # fmt: skip
        """Merge the network (at its multiplier) into the models; only the parts ``weights_sd`` has keys for."""
        if weights_sd is not None:
            keys = list(weights_sd)
            self._keep(any(k.startswith(TE_PREFIX) for k in keys), any(k.startswith(UNET_PREFIX) for k in keys))
        super().merge_to(self.multiplier)

    def set_loraplus_lr_ratio(
        self, loraplus_lr_ratio: float | None, loraplus_unet_lr_ratio: float | None,
        loraplus_text_encoder_lr_ratio: float | None,
    ) -> None:  # fmt: skip
        """LoRA+: the ``plus_params`` factors (LoRA's ``lora_up``) train at ``lr · ratio``."""
        self.loraplus_lr_ratio = _ratio(loraplus_lr_ratio)
        self.loraplus_unet_lr_ratio = _ratio(loraplus_unet_lr_ratio)
        self.loraplus_text_encoder_lr_ratio = _ratio(loraplus_text_encoder_lr_ratio)

    def prepare_optimizer_params(  # type: ignore[override]
        self, text_encoder_lr: float | None = None, unet_lr: float | None = 1e-4, learning_rate: float | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """``(param groups, descriptions)`` as sd-scripts expects: text encoder and UNet groups at their learning
        rates (``learning_rate`` where one is ``None``), each split in a LoRA+ group when a ratio is set; a group
        whose learning rate is 0 or ``None`` is left out (not trained)."""
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []
        for kind, lr, ratio in (
            ("textencoder", text_encoder_lr if text_encoder_lr is not None else learning_rate,
             self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio),
            ("unet", unet_lr if unet_lr is not None else learning_rate, self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio),
        ):  # fmt: skip
            plain: list[nn.Parameter] = []
            plus: list[nn.Parameter] = []
            for adapter in self.text_encoder_loras if kind == "textencoder" else self.unet_loras:
                for name, param in adapter.named_parameters():
                    (plus if ratio is not None and name in adapter.plus_params else plain).append(param)
            for params, is_plus in ((plain, False), (plus, True)):
                if not params or not lr:
                    continue
                groups.append({"params": params, "lr": lr * ratio if is_plus else lr})
                descriptions.append(kind + (" plus" if is_plus else ""))
        return groups, descriptions


def create_network(
    multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any, text_encoder: Any,
    unet: nn.Module, neuron_dropout: float | None = None, **kwargs: Any,
) -> LycorisNetworkKohya:  # fmt: skip
    """sd-scripts' entry point: a network on the text encoder(s) and UNet from ``--network_dim``,
    ``--network_alpha`` and ``--network_args`` (strings, parsed as lycoris-lora parses them; ``preset`` a built-in
    name or a TOML/JSON file). ``vae`` and ``neuron_dropout`` are unused (as in lycoris-lora)."""
    kwargs = dict(kwargs)
    preset = kwargs.pop("preset", None) or "full"  # lycoris-lora applies "full" unless told otherwise
    algo = str(kwargs.pop("algo", None) or "lora")
    dim = 4 if network_dim is None else network_dim
    alpha = 1 if network_alpha is None else network_alpha
    conv_dim = kwargs.pop("conv_dim", None) or dim
    conv_alpha = kwargs.pop("conv_alpha", None) or alpha
    ratios = [kwargs.get(k) for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    network = LycorisNetworkKohya(
        text_encoder, unet, multiplier, dim, conv_dim, alpha, conv_alpha, network_module=algo,
        preset=os.fspath(preset) if isinstance(preset, os.PathLike) else preset, **kwargs,
    )  # fmt: skip
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network


def create_network_from_weights(
    multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any, unet: nn.Module,
    weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False, allow_pickle: bool = False,
    **kwargs: Any,
) -> tuple[LycorisNetworkKohya, dict[str, torch.Tensor]]:  # fmt: skip
    """A network whose modules, methods, shapes and alphas are those of a kohya/LyCORIS file (``lora_unet_…``,
    ``lora_te_…`` / ``lora_te1_…`` keys), not yet applied: ``(network, weights)``."""
    weights, metadata = read_weights(file, weights_sd, allow_pickle, "create_network_from_weights")
    network = LycorisNetworkKohya(text_encoder, unet, multiplier, init_only=True)
    roots = [(prefix, te, "te") for prefix, te in _text_encoders(text_encoder)] + [(UNET_PREFIX, unet, "unet")]
    from_weights(network, roots, weights, metadata, str(file or "weights_sd"))
    if for_inference:
        network.requires_grad_(False)
    return network, weights
