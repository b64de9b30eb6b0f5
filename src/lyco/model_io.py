"""The file and tensor I/O of :class:`~lyco.LycoModel` (its base class :class:`AdapterIO`): PEFT folders
(``save_pretrained`` / ``from_pretrained`` / ``load_adapter``) and adapters from plain tensors
(``from_adapter_tensors`` / ``load_adapter_tensors``, what every file loader builds on), with the one
rollback of a failed load; and the argument checks the model's methods share.

Files are read and written by :mod:`lyco.formats.peft`; tensors go in and out of the module tree through
:mod:`lyco.tree`. The methods use the model's public API (``add_adapter``, ``delete_adapter``, ``unload``,
``set_trainable``, ``require_adapters``, ``adapted_layers``, ``saved_modules``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Self

import torch
from torch import nn

from .errors import ArgumentError, FormatError, TargetError
from .formats.names import ModuleTable
from .formats.peft import adapter_dir, peft_key, peft_tensors, read_peft_dir, write_peft_dir
from .methods.config import AdapterConfig
from .sharding import full_weights, is_sharded
from .tree import adapter_tensors, infer_plans, load_adapter_tensors


@contextlib.contextmanager
def _naming(source: str) -> Iterator[None]:
    """Targeting errors raised while building an adapter from a file name the file (same error class)."""
    try:
        yield
    except TargetError as exc:
        raise type(exc)(f"{source}: {exc}") from None


def names_arg(value: Any, what: str) -> list[str]:
    """Adapter names given as one name or a list of them (:class:`ArgumentError` for anything else)."""
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ArgumentError(f"{what} takes an adapter name or a list of names, got {value!r}")
    return names


def as_module(value: Any, what: str) -> nn.Module:
    """``value`` when it is an ``nn.Module`` (:class:`ArgumentError` naming ``what`` otherwise)."""
    if not isinstance(value, nn.Module):
        raise ArgumentError(f"{what} needs a torch.nn.Module, got {type(value).__name__}")
    return value


class AdapterIO(nn.Module):
    """PEFT-folder and tensor I/O of a :class:`~lyco.LycoModel` (which derives from it)."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        is_main_process: bool | None = None,
    ) -> None:
        """Write each adapter as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors``;
        the adapter named ``default`` at the top, others in sub-folders named after them.

        FSDP2-sharded model (``fully_shard``): call it on every rank; the adapter weights are gathered and
        ``is_main_process`` (default: rank 0) writes the full, unsharded files; every rank returns once
        they exist. Unsharded model: writes unless ``is_main_process=False``.
        """
        if not isinstance(save_directory, (str, os.PathLike)):
            raise ArgumentError(f"save_pretrained needs a folder path, got {type(save_directory).__name__}")
        names = list(self.peft_config) if selected_adapters is None else names_arg(selected_adapters, "selected_adapters")
        self.require_adapters(names)
        if not is_sharded(self):
            if is_main_process is not False:
                for name in names:
                    self._write_peft(name, save_directory)
            return
        import torch.distributed as dist

        modules = [layer.lyco_adapters[n] for _, layer in self.adapted_layers() for n in names if n in layer.lyco_adapters]
        modules += [w.modules_to_save[n] for _, w in self.saved_modules() for n in names if n in w.modules_to_save]
        with full_weights(self, modules):
            if is_main_process if is_main_process is not None else dist.get_rank() == 0:
                for name in names:
                    self._write_peft(name, save_directory)
        dist.barrier()

    def _write_peft(self, adapter_name: str, save_directory: str | os.PathLike) -> None:
        tensors = adapter_tensors(self.model, adapter_name)
        if any(t.device.type == "meta" for t in tensors.values()):
            raise FormatError(f"adapter {adapter_name!r} has weights on the meta device; load or initialise them first")
        write_peft_dir(adapter_dir(save_directory, adapter_name), self.peft_config[adapter_name], tensors, self.model)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Load an adapter directory (written by lyco or peft) as a new adapter ``adapter_name``.
        ``low_cpu_mem_usage`` (PEFT's): accepted; lyco always builds the adapter on the meta device and fills it
        from the file, so memory never holds two copies."""
        table = ModuleTable.from_module(self.model)
        config, tensors = read_peft_dir(model_id, allow_pickle=allow_pickle, subfolder=subfolder, table=table)
        self.load_adapter_tensors(adapter_name, config, tensors, is_trainable=is_trainable, source=str(model_id), key_names=peft_key)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> Self:
        """Wrap ``model`` with the adapter stored in ``model_id`` (a PEFT directory); on any error ``model`` is
        left as it was. ``kwargs``: :class:`LycoModel` options (``compute_dtype``, ``autocast_adapter_dtype``).
        ``low_cpu_mem_usage``: accepted for PEFT's signature; loading is always on the meta device first."""
        table = ModuleTable.from_module(as_module(model, "from_pretrained"))
        config, tensors = read_peft_dir(model_id, allow_pickle=allow_pickle, subfolder=subfolder, table=table)
        return cls.from_adapter_tensors(
            model, config, tensors, adapter_name, is_trainable=is_trainable, source=str(model_id), key_names=peft_key, **kwargs
        )

    # -- tensors (what file loaders build on) -----------------------------------------------------------
    @classmethod
    def from_adapter_tensors(
        cls,
        model: nn.Module,
        config: AdapterConfig,
        tensors: Mapping[str, torch.Tensor],
        adapter_name: str = "default",
        *,
        plans: Mapping[str, Any] | None = None,
        is_trainable: bool = False,
        source: str = "<tensors>",
        key_names: Callable[[str], str | None] | None = None,
        **kwargs: Any,
    ) -> Self:
        """Wrap ``model`` with an adapter whose weights are ``tensors`` (keyed ``<module path>.<param>``, lyco's
        layouts; see :mod:`lyco.tree`). ``plans``: per-module shape plans (default: inferred from the tensors,
        so a split the config would not plan loads exactly). Adapters are created on the meta device and
        materialised from the tensors; on any error ``model`` is left as it was. ``key_names``: how ``source``
        spells a key, for messages (e.g. with PEFT's prefix). ``is_trainable=False`` freezes the adapter and puts the model in eval mode."""
        plans = infer_plans(as_module(model, "from_adapter_tensors"), config, tensors) if plans is None else plans
        with _naming(source):
            lyco_model = cls(model, config, adapter_name, low_cpu_mem_usage=True, plans=plans, **kwargs)
        lyco_model._fill(adapter_name, tensors, source, is_trainable, key_names, undo=lyco_model.unload)
        return lyco_model

    def load_adapter_tensors(
        self,
        adapter_name: str,
        config: AdapterConfig,
        tensors: Mapping[str, torch.Tensor],
        *,
        plans: Mapping[str, Any] | None = None,
        is_trainable: bool = False,
        source: str = "<tensors>",
        key_names: Callable[[str], str | None] | None = None,
    ) -> None:
        """Add adapter ``adapter_name`` with weights ``tensors`` (as :meth:`from_adapter_tensors`); all or nothing."""
        plans = infer_plans(self.model, config, tensors) if plans is None else plans
        with _naming(source):
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=True, plans=plans)
        self._fill(adapter_name, tensors, source, is_trainable, key_names, undo=lambda: self.delete_adapter(adapter_name))

    def _fill(
        self,
        adapter_name: str,
        tensors: Mapping[str, torch.Tensor],
        source: str,
        is_trainable: bool,
        key_names: Callable[[str], str | None] | None,
        undo: Callable[[], object],
    ) -> None:
        """Load the new adapter's weights; on any error ``undo()`` removes what was added (the one rollback)."""
        try:
            load_adapter_tensors(self.model, {adapter_name: tensors}, source, show=key_names or str)
        except BaseException:
            undo()
            raise
        self.set_trainable(adapter_name, is_trainable)
        if not is_trainable:
            self.eval()


def adapter_state_dict(model: AdapterIO, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors as PEFT keys and layouts (``base_model.model.<module>.<param>``): exactly what
    ``save_pretrained`` writes to ``adapter_model.safetensors`` (PEFT's ``get_peft_model_state_dict``)."""
    model.require_adapters([adapter_name])
    return peft_tensors(model.peft_config[adapter_name], adapter_tensors(model.model, adapter_name))
