"""lycoris-lora's Python API on lyco's adapters: :func:`create_lycoris`, :func:`create_lycoris_from_weights` and
:class:`LycorisNetwork` — for trainers that call LyCORIS directly (SimpleTuner and the like); switching is the
import ``from lyco.network import create_lycoris, LycorisNetwork``. ``lyco.kohya`` builds on it for kohya
sd-scripts.

A network plans its modules with LyCORIS's rules (:mod:`lyco.lycoris_config`) and holds one lyco adapter per
root module: ``apply_to()`` puts lyco's wrapped layers into the model (the forward then runs lyco's factored
paths), ``restore()`` takes them out again. Its own ``parameters()`` are the adapters' (nothing of the base
model), its ``state_dict()`` is the LyCORIS file (``<prefix>_<module path>.<tensor>``, scalars folded, ``alpha``
per module), ``save_weights`` writes it atomically. Deviations from lycoris-lora: presets are values (a network
keeps the preset it was built with; :meth:`LycorisNetwork.apply_preset` only sets the default for the next ones),
loading is all or nothing (a missing, unexpected or mis-shaped tensor, or an alpha other than the network's, is an
error naming it, with nothing changed), and files are safetensors (pickles load only with ``allow_pickle=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .errors import ArgumentError, ConfigError, FormatError, MergeError, StateError
from .formats.adapterfile import AdapterFile
from .formats.io import read_metadata, read_tensors, write_tensors
from .formats.lycoris import lycoris_state_dict, parse_state_dict, resolve_adapter_file
from .formats.metadata import NETWORK_MODULE, base_model_metadata
from .formats.names import ModuleTable
from .layer import AdaptedLayer
from .lycoris_config import LycorisOptions, Planned, Preset, load_preset, mixed_config, plan_modules
from .lycoris_files import fit_file, layers_file
from .model import LycoModel, set_submodule
from .tree import load_adapter_tensors

__all__ = ["LycorisNetwork", "create_lycoris", "create_lycoris_from_weights", "lycoris_model"]

ADAPTER = "default"  # the adapter name a network's layers hold


class LoadInfo(NamedTuple):
    """What ``load_state_dict`` returns (always empty: loading is strict)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass
class Root:
    """One module tree a network adapts (a model; kohya: a text encoder or the UNet): its LyCORIS ``prefix`` (keys
    ``<prefix>_<path>``), its wrapped layers by path and their LyCORIS names; ``installed``: whether the wrapped
    layers are in the tree."""

    prefix: str
    module: nn.Module
    kind: str
    layers: dict[str, AdaptedLayer] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    installed: bool = True

    def install(self, on: bool) -> None:
        if on != self.installed:
            for path, layer in self.layers.items():
                set_submodule(self.module, path, layer if on else layer.base_layer)
            self.installed = on

    def items(self) -> Iterator[tuple[str, AdaptedLayer]]:
        return iter(self.layers.items())


def _requires_grad(module: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in module.parameters()]


def _wrap(module: nn.Module, config: Any, tensors: Mapping[str, torch.Tensor] | None = None, plans=None, source: str = "") -> LycoModel:
    """``module`` with one lyco adapter (fresh, or from ``tensors``), its parameters' ``requires_grad`` as they
    were (LyCORIS never freezes the base model; trainers do)."""
    flags = _requires_grad(module)
    if tensors is None:
        lyco = LycoModel(module, config, ADAPTER, plans=plans)
    else:
        lyco = LycoModel.from_adapter_tensors(module, config, tensors, ADAPTER, plans=plans, is_trainable=True, source=source)
    for p, flag in flags:
        p.requires_grad_(flag)
    return lyco


def _dotted(prefix: str, path: str) -> str:
    return f"{prefix}_{path}".replace(".", "_")


class LycorisNetwork(nn.Module):
    """A LyCORIS network on lyco's adapters, with lycoris-lora's constructor and methods.

    ``LycorisNetwork(module, multiplier, lora_dim, conv_lora_dim, alpha, conv_alpha, use_tucker, dropout, rank_dropout,
    module_dropout, network_module="locon", **options)``: the modules of ``module`` the preset selects (see
    :mod:`lyco.lycoris_config`), each with a lyco adapter of its algorithm. ``preset``: a preset dict, name or file
    (default: the class preset set by :meth:`apply_preset`). ``loras``: the adapters (``lora_name`` set on each).
    """

    preset: ClassVar[Preset] = Preset()

    @classmethod
    def apply_preset(cls, preset: Mapping[str, Any] | str | os.PathLike) -> type[LycorisNetwork]:
        """Set the preset keys ``preset`` gives (a dict, a built-in name or a TOML/JSON file) as the default of
        the networks created after this call; networks already built keep theirs."""
        cls.preset = cls.preset.updated(preset if not isinstance(preset, os.PathLike) else Path(preset))
        return cls

    def __init__(
        self,
        module: Any = None,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        conv_lora_dim: int = 4,
        alpha: float = 1,
        conv_alpha: float = 1,
        use_tucker: bool = False,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        network_module: str = "locon",
        init_only: bool = False,
        preset: Mapping[str, Any] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.multiplier = float(multiplier)
        self.roots: list[Root] = []
        self.merged = False
        self.weights_sd: dict[str, torch.Tensor] | None = None
        self.network_preset = type(self).preset if preset is None else type(self).preset.updated(preset)
        extra = kwargs.pop("apply_preset", None)
        if isinstance(extra, Mapping):  # SimpleTuner's lycoris_config.json key
            self.network_preset = self.network_preset.updated(extra, "apply_preset")
        if init_only:
            return
        self.options = LycorisOptions.from_kwargs(
            lora_dim, alpha,
            {"algo": network_module, "conv_dim": conv_lora_dim, "conv_alpha": conv_alpha, "use_tucker": use_tucker,
             "dropout": dropout, "rank_dropout": rank_dropout, "module_dropout": module_dropout, **kwargs},
            type(self).__name__,
        )  # fmt: skip
        self.build(self.targets(module))

    # -- building --------------------------------------------------------------------------------------
    def targets(self, module: Any) -> list[tuple[str, nn.Module, str, tuple[str, ...] | None, tuple[str, ...] | None]]:
        """``(prefix, root, kind, target classes, target names)`` per root of what the constructor was given
        (``None``: the preset's rule); subclasses with several roots (kohya's text encoders and UNet) override it."""
        if not isinstance(module, nn.Module):
            raise ArgumentError(f"a LycorisNetwork adapts an nn.Module, got {type(module).__name__}")
        return [(self.network_preset.lora_prefix, module, "root", None, None)]

    def build(self, roots: Iterable[tuple[str, nn.Module, str, tuple[str, ...] | None, tuple[str, ...] | None]]) -> None:
        """Plan every root, then adapt them (a root whose plan fails leaves every root untouched)."""
        plans: list[tuple[str, nn.Module, str, list[Planned]]] = []
        for prefix, module, kind, classes, names in roots:
            planned = plan_modules(module, prefix, self.options, self.network_preset, classes, names)
            if planned:
                plans.append((prefix, module, kind, planned))
        built: list[Root] = []
        try:
            for prefix, module, kind, planned in plans:
                plans = {p.path: p.plan for p in planned if p.plan is not None}
                lyco = _wrap(module, mixed_config(planned), plans=plans)
                built.append(self._root(prefix, module, kind, lyco, {p.path: p.lora_name for p in planned}))
        except Exception:
            for root in built:
                root.install(False)
            raise
        self._adopt(built)

    def _root(self, prefix: str, module: nn.Module, kind: str, lyco: LycoModel, names: Mapping[str, str]) -> Root:
        layers = dict(lyco.adapted_layers())
        return Root(prefix, module, kind, layers, {path: names[path] for path in layers})

    def _adopt(self, roots: list[Root]) -> None:
        """Register the adapters of ``roots`` as this network's children (by LyCORIS name), not yet applied."""
        for root in roots:
            for path, layer in root.items():
                adapter = layer.lyco_adapters[ADAPTER]
                adapter.lora_name = root.names[path]
                self.add_module(root.names[path], adapter)
                layer.set_scale(ADAPTER, self.multiplier)
            root.install(False)
        self.roots.extend(roots)

    # -- lycoris-lora's methods -------------------------------------------------------------------------
    @property
    def loras(self) -> list[nn.Module]:
        """Every adapter of the network (``lora_name`` names it), roots in order."""
        return [layer.lyco_adapters[ADAPTER] for root in self.roots for _, layer in root.items()]

    def layers(self) -> Iterator[tuple[Root, str, AdaptedLayer]]:
        for root in self.roots:
            for path, layer in root.items():
                yield root, path, layer

    def apply_to(self) -> None:
        """Put the wrapped layers into the model(s) (the adapters then act in every forward). Weights given to
        :meth:`load_weights` before are already in the adapters (lycoris-lora loads them again here)."""
        if self.merged:
            raise StateError("this network was merged into the model (merge_to); create a new one to apply")
        for root in self.roots:
            root.install(True)

    def restore(self) -> None:
        """Take the wrapped layers out again: the model's own modules, unchanged, are back in place."""
        for root in self.roots:
            root.install(False)

    def set_multiplier(self, multiplier: float) -> None:
        """Scale every adapter's ``ΔW`` by ``multiplier`` (on top of ``alpha / r``)."""
        self.multiplier = float(multiplier)
        for _, _, layer in self.layers():
            layer.set_scale(ADAPTER, self.multiplier)

    def is_mergeable(self) -> bool:
        """Whether every adapted layer's weight can take a merge."""
        try:
            for _, path, layer in self.layers():
                layer.check_mergeable(path)
        except MergeError:
            return False
        return True

    def merge_to(self, weight: float = 1.0, **_: Any) -> None:
        """Add ``weight · ΔW`` of every adapter into its layer's weight and take the wrapped layers out (the model is
        left plain, with the merged weights); the network cannot be applied again."""
        if self.merged:
            raise StateError("this network is already merged into the model")
        layers = list(self.layers())
        for _, path, layer in layers:
            layer.check_mergeable(path)
        for _, _, layer in layers:
            layer.set_scale(ADAPTER, float(weight))
            layer.merge(adapter_names=[ADAPTER])
        self.restore()
        self.merged = True

    def train(self, mode: bool = True) -> LycorisNetwork:
        """Training mode of the adapters and of the wrapped layers (dropout, rank and module dropout act in training,
        as the LyCORIS modules' own mode decides there); the base layers' own mode is left alone."""
        super().train(mode)
        for _, _, layer in self.layers():
            layer.training = mode
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: checkpointing belongs to the model (the wrapped layers run inside its checkpoints)."""

    def prepare_grad_etc(self, *args: Any) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, *args: Any) -> None:
        self.train()

    def on_step_start(self, *args: Any) -> None:
        """Nothing per step (LyCORIS's modules have no step state)."""

    def get_trainable_params(self, *args: Any) -> Iterator[nn.Parameter]:
        return self.parameters()

    def prepare_optimizer_params(self, lr: float | None = None) -> list[dict[str, Any]]:
        """One optimizer group with every adapter parameter (``lr`` set when given); makes them trainable."""
        self.requires_grad_(True)
        group: dict[str, Any] = {"params": list(self.parameters())}
        if lr is not None:
            group["lr"] = lr
        return [group]

    def apply_max_norm_regularization(self, max_norm_value: float, device: Any = None) -> tuple[int, float, float]:
        """Scale down every adapter whose ``‖scale·ΔW‖`` exceeds ``max_norm_value`` to that norm (kohya's
        ``--scale_weight_norms``): ``(modules scaled, mean norm, max norm)`` over the norms after scaling."""
        scaled, norms = 0, []
        with torch.no_grad():
            for adapter in self.loras:
                norm = float((adapter.delta_weight(torch.float32) * adapter.base_scaling).norm())
                desired = min(norm, float(max_norm_value))
                if norm > 0 and desired < norm:
                    params = dict(adapter.named_parameters(recurse=False))
                    for name, t in adapter.fold_scale(adapter.tensors(), desired / norm).items():
                        if t is not params[name]:
                            params[name].copy_(t)
                    scaled += 1
                norms.append(desired)
        if not scaled:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # -- state dict and files ---------------------------------------------------------------------------
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The LyCORIS file's tensors: ``<prefix>_<module path>.<tensor>`` with each module's ``alpha``."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict() if destination is None else destination
        for root in self.roots:
            af = layers_file(root.items(), ADAPTER)
            if af.modules:
                for key, t in lycoris_state_dict(af, style="lycoris", prefix=f"{root.prefix}_").items():
                    out[prefix + key] = t
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False) -> LoadInfo:  # type: ignore[override]
        """Load a LyCORIS state dict (:meth:`state_dict`'s keys, or any LyCORIS/kohya spelling of them) into the
        adapters, all or nothing: every tensor must be there with its shape and each module's alpha must give the
        network's scale; otherwise :class:`FormatError` / :class:`ShapeMismatchError` names the key."""
        self._load(dict(state_dict), "state dict")
        return LoadInfo([], [])

    def _load(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        pending: list[tuple[Root, dict[str, torch.Tensor], Any]] = []
        claimed: set[str] = set()
        for root in self.roots:
            own, af = root_file(tensors, {}, root.prefix, root.module, source, strict=True)
            claimed |= set(own)
            for path, m in af.modules.items():
                layer = root.layers.get(path)
                if layer is None:
                    raise FormatError(f"{source}: {root.names.get(path, path)!r} is not a module of this network")
                adapter = layer.lyco_adapters[ADAPTER]
                scale = m.scale()
                if not (abs(scale - adapter.base_scaling) <= 1e-6 * max(1.0, abs(scale)) or m.alpha == adapter.alpha):
                    raise FormatError(
                        f"{source}: {root.names[path]!r} has alpha {m.alpha} (scale {scale:g}) but this network's "
                        f"module has scale {adapter.base_scaling:g}; build the network from the file "
                        "(create_lycoris_from_weights / create_network_from_weights) or with the same alpha"
                    )
            pending.append((root, af.tensors(), self._key_names(root)))
        unknown = sorted(set(tensors) - claimed)
        if unknown:
            raise FormatError(f"{source}: {len(unknown)} key(s) belong to no root of this network: {unknown[:6]}")
        states = [root.installed for root, _, _ in pending]
        try:
            for root, _, _ in pending:
                root.install(True)
            for root, part, show in pending:  # each root checks every key before any is written
                load_adapter_tensors(root.module, {ADAPTER: part}, source, show=show)
        finally:
            for (root, _, _), on in zip(pending, states, strict=True):
                root.install(on)

    @staticmethod
    def _key_names(root: Root) -> Any:
        """``<module path>.<tensor>`` → the LyCORIS key (``lycoris_net_fc.lora_up.weight``), for messages."""
        keys = {}
        for path, layer in root.items():
            for name, param in layer.lyco_adapters[ADAPTER].tensor_params().items():
                keys[f"{path}.{name}"] = f"{root.names[path]}.{param.file_key}"
        return lambda key: keys.get(key, key)

    def load_weights(self, file: str | os.PathLike, allow_pickle: bool = False) -> dict[str, list[str]]:
        """Load a LyCORIS file into the adapters (see :meth:`load_state_dict`); returns ``{}`` (nothing missing)."""
        self.weights_sd = read_tensors(file, allow_pickle=allow_pickle)
        self._load(dict(self.weights_sd), str(file))
        return {}

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> None:
        """Write :meth:`state_dict` (cast to ``dtype``) with ``metadata`` as a safetensors file, atomically; adds
        ``sshs_model_hash`` (sha256 of the tensors' bytes), and for a diffusers model the base-model fields kohya
        writes when ``metadata`` lacks them. ``ss_network_module`` naming lyco's module is written as LyCORIS's
        (consumers classify files by it)."""
        if not str(file).endswith(".safetensors"):
            raise FormatError(f"{file}: lyco writes networks as .safetensors only (kohya: --save_model_as safetensors)")
        tensors = {k: (v.detach().to("cpu", dtype) if dtype is not None else v.detach().cpu()).contiguous()
                   for k, v in self.state_dict().items()}  # fmt: skip
        if not tensors:
            raise FormatError(f"{file}: the network has no modules to save")
        meta = dict(metadata or {})
        for root in self.roots:
            if root.kind != "te":
                for k, v in base_model_metadata(root.module).items():
                    meta.setdefault(k, v)
        if meta.get("ss_network_module", "").startswith("lyco"):
            meta["ss_network_module"] = NETWORK_MODULE
        meta["sshs_model_hash"] = tensors_hash(tensors)
        bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise FormatError(f"{file}: metadata values must be strings (safetensors); not: {bad}")
        write_tensors(file, tensors, meta)


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors' raw bytes in key order, ``0x``-prefixed (kohya's ``sshs_model_hash`` form)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "0x" + digest.hexdigest()


def create_lycoris(
    module: nn.Module, multiplier: float = 1.0, linear_dim: int = 4, linear_alpha: float = 1, **kwargs: Any
) -> LycorisNetwork:
    """lycoris-lora's ``create_lycoris``: a network on ``module`` with LyCORIS's keywords (``algo``, ``conv_dim``,
    ``conv_alpha``, ``dropout``, ``rank_dropout``, ``module_dropout``, ``use_tucker``, ``use_scalar``, ``rs_lora``,
    ``dora_wd``, ``wd_on_output``, ``factor``, ``decompose_both``, ``full_matrix``, ``unbalanced_factorization``,
    ``rank_dropout_scale``, ``bypass_mode``…) and ``preset`` (a built-in name, a file, or a dict; default: the
    class preset, :meth:`LycorisNetwork.apply_preset`). ``apply_preset``: a dict of preset keys for this network
    (SimpleTuner's ``lycoris_config.json`` key). Options naming a feature lyco lacks are a :class:`ConfigError`."""
    kwargs = dict(kwargs)
    preset = kwargs.pop("preset", None) or "full"  # lycoris-lora applies "full" (enable_conv) unless told otherwise
    if preset is not None and not isinstance(preset, (str, Mapping, os.PathLike)):
        raise ArgumentError(f"preset must be a preset name, a file or a dict, got {type(preset).__name__}")
    algo = kwargs.pop("algo", "lora") or "lora"
    conv_dim = kwargs.pop("conv_dim", None) or linear_dim
    conv_alpha = kwargs.pop("conv_alpha", None) or linear_alpha
    return LycorisNetwork(
        module, multiplier, linear_dim if linear_dim is not None else 4, conv_dim, linear_alpha, conv_alpha,
        network_module=str(algo), preset=str(preset) if isinstance(preset, os.PathLike) else preset, **kwargs,
    )  # fmt: skip


def root_file(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], prefix: str, module: nn.Module, source: str,
    strict: bool,
) -> tuple[dict[str, torch.Tensor], AdapterFile]:  # fmt: skip
    """The keys of one root (``<prefix>_…``) and the adapter they make, resolved against ``module`` (``strict=False``:
    keys matching none of its modules are dropped with a warning)."""
    own = {k: v for k, v in tensors.items() if k.startswith(f"{prefix}_")}
    if not own:
        return own, AdapterFile({})
    af = resolve_adapter_file(
        parse_state_dict(own, dict(metadata), source, prefix=f"{prefix}_", strict=strict),
        ModuleTable.from_module(module), prefix=f"{prefix}_", strict=strict, source=source,
    )  # fmt: skip
    return own, af


def from_weights(
    network: LycorisNetwork, roots: list[tuple[str, nn.Module, str]], tensors: dict[str, torch.Tensor],
    metadata: Mapping[str, str], source: str,
) -> None:  # fmt: skip
    """Build ``network``'s adapters from a file's tensors: each root takes the keys of its prefix, with the shapes,
    methods and alphas the file gives (keys matching no module of the root are dropped with a warning)."""
    built: list[Root] = []
    try:
        for prefix, module, kind in roots:
            own, af = root_file(tensors, metadata, prefix, module, source, strict=False)
            if not own or not af.modules:
                continue
            fit = fit_file(module, af, set())
            lyco = _wrap(module, fit.config, af.tensors(), fit.plans, source)
            built.append(network._root(prefix, module, kind, lyco, {p: _dotted(prefix, p) for p in af.modules}))
    except Exception:
        for root in built:
            root.install(False)
        raise
    if not built:
        raise FormatError(f"{source}: no module of the file matches the model")
    network._adopt(built)


def read_weights(
    file: str | os.PathLike | None, weights_sd: Mapping[str, torch.Tensor] | None, allow_pickle: bool, caller: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of ``weights_sd`` when given (no metadata), else of ``file`` (safetensors; pickles only
    with ``allow_pickle``)."""
    if weights_sd is not None:
        return dict(weights_sd), {}
    if file is None:
        raise ArgumentError(f"{caller} needs a file or weights_sd")
    return read_tensors(file, allow_pickle=allow_pickle), read_metadata(file)


def create_lycoris_from_weights(
    multiplier: float, file: str | os.PathLike | None, module: nn.Module,
    weights_sd: Mapping[str, torch.Tensor] | None = None, allow_pickle: bool = False, **kwargs: Any,
) -> tuple[LycorisNetwork, dict[str, torch.Tensor]]:  # fmt: skip
    """lycoris-lora's ``create_lycoris_from_weights``: a network whose modules, methods, shapes and alphas are those
    of the file (or ``weights_sd``), not yet applied; returns ``(network, weights)``."""
    weights, metadata = read_weights(file, weights_sd, allow_pickle, "create_lycoris_from_weights")
    network = LycorisNetwork(init_only=True, multiplier=multiplier)
    from_weights(network, [(network.network_preset.lora_prefix, module, "root")], weights, metadata, str(file or "weights_sd"))
    return network, weights


def lycoris_model(
    model: nn.Module, config: Mapping[str, Any] | str | os.PathLike, adapter_name: str = "default"
) -> LycoModel:
    """A :class:`~lyco.LycoModel` (PEFT-style: base frozen, ``save_lycoris`` / ``merge_and_unload`` / several
    adapters) whose adapter is what a LyCORIS config gives: a dict or a JSON file such as SimpleTuner's
    ``lycoris_config.json`` — ``algo``, ``multiplier``, ``linear_dim``, ``linear_alpha``, ``preset`` (default
    ``"full"``), ``apply_preset`` (preset keys) and the module options — with LyCORIS's modules, shapes and scales
    (e.g. a full-matrix LoKr at scale 1, not ``alpha / r``). ``multiplier`` becomes the adapter's scale."""
    if isinstance(config, (str, os.PathLike)):
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{config}: cannot read the LyCORIS config ({exc})") from None
    if not isinstance(config, Mapping):
        raise ConfigError(f"a LyCORIS config is a dict or a JSON file, got {type(config).__name__}")
    data = dict(config)
    multiplier = float(data.pop("multiplier", 1.0) or 1.0)
    dim, alpha = data.pop("linear_dim", 4), data.pop("linear_alpha", 1)
    preset = Preset().updated(load_preset(data.pop("preset", None) or "full"))
    extra = data.pop("apply_preset", None)
    if extra:
        preset = preset.updated(extra, "apply_preset")
    options = LycorisOptions.from_kwargs(dim, alpha, data, "lycoris config")
    planned = plan_modules(model, preset.lora_prefix, options, preset)
    if not planned:
        raise ConfigError(f"the LyCORIS config adapts no module of {type(model).__name__}; check target_module / target_name")
    plans = {p.path: p.plan for p in planned if p.plan is not None}
    lyco = LycoModel(model, mixed_config(planned), adapter_name, plans=plans)
    if multiplier != 1.0:
        lyco.set_scale(adapter_name, multiplier)
    return lyco
