"""``transformers.Trainer`` checkpoints of a :class:`~lyco.LycoModel` that hold the adapter, as for PEFT.

``Trainer`` calls ``save_pretrained`` only for ``PreTrainedModel`` / ``PeftModel``; any other model is
saved as its full state dict (``safetensors.save_file``: the whole base model, and an error for tied
embeddings such as GPT-2's), and resuming loads that state dict back. :class:`LycoTrainer` (or
:class:`LycoTrainerMixin` in front of another ``Trainer`` subclass) instead

- saves (``save_strategy`` checkpoints, ``trainer.save_model()``) with ``LycoModel.save_pretrained``:
  ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter (``default`` at the top, others in
  sub-folders), plus Trainer's usual ``training_args.bin`` / tokenizer;
- takes ``label_names`` from the base model's class (Trainer reads them from ``type(model).forward``,
  which for a ``LycoModel`` names no labels, so evaluation would report no ``eval_loss``);
- with ``label_smoothing_factor`` on a causal-LM base, shifts the labels as Trainer does for the bare
  model (Trainer recognises causal LMs by the *wrapper*'s class name, so it would not shift them);
- sets DDP's ``find_unused_parameters`` (when ``ddp_find_unused_parameters`` is not given) as Trainer
  does for the bare ``PreTrainedModel``: off under activation checkpointing, which it breaks, instead of
  the always-on default Trainer uses for other models (lyco needs it in neither case: every live adapter
  parameter takes part in each step, module dropout included);
- on ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` copies the checkpoint's adapter
  weights into the existing parameters in place (Trainer restores optimizer, scheduler and RNG itself).

Models that are not a ``LycoModel``, checkpoints without adapter files, and the DeepSpeed / FSDP /
SageMaker paths (which hand ``_save`` a gathered state dict) keep Trainer's own behaviour.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels, logging

from ..errors import FormatError
from ..formats.names import ModuleTable
from ..formats.peft import CONFIG_NAME, adapter_dir, peft_key, read_peft_dir
from ..model import LycoModel
from ..sharding import is_sharded
from ..tree import load_adapter_tensors

__all__ = ["LycoTrainer", "LycoTrainerMixin", "copy_adapter_weights"]

logger = logging.get_logger(__name__)


def _has_adapter(model: LycoModel, checkpoint: str | os.PathLike | None) -> bool:
    return checkpoint is not None and (adapter_dir(checkpoint, model.active_adapter) / CONFIG_NAME).is_file()


def copy_adapter_weights(model: LycoModel, checkpoint: str | os.PathLike) -> list[str]:
    """Copy every adapter of ``model`` from a ``save_pretrained`` folder into its existing parameters, in
    place (parameter objects, and so an optimizer's references, stay the same). Returns the names loaded.

    Each adapter must be in the folder with exactly the keys and shapes the model has; otherwise
    :class:`~lyco.FormatError` / :class:`~lyco.ShapeMismatchError` and nothing is copied.
    """
    table = ModuleTable.from_module(model.model)
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for name, config in model.peft_config.items():
        folder = adapter_dir(checkpoint, name)
        if not (folder / CONFIG_NAME).is_file():
            raise FormatError(f"{checkpoint}: no adapter {name!r} ({folder / CONFIG_NAME} is missing)")
        saved, tensors = read_peft_dir(folder, table=table)
        if saved.peft_type != config.peft_type:
            raise FormatError(f"{folder}: a {saved.peft_type} adapter, the model's {name!r} is {config.peft_type}")
        loaded[name] = tensors
    load_adapter_tensors(model.model, loaded, str(checkpoint), show=peft_key)
    return list(loaded)


class LycoTrainerMixin:
    """Put in front of ``transformers.Trainer`` or a subclass of it (``class T(LycoTrainerMixin, SFTTrainer)``)
    to checkpoint a :class:`~lyco.LycoModel` as its adapter; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._lyco_model()
        if model is not None:
            # Trainer finds label names in the model *class*'s forward signature; LycoModel.forward is
            # (*args, **kwargs), so it would find none and evaluation would report no loss.
            base = type(model.get_base_model())
            if self.args.label_names is None:
                self.label_names = find_labels(base)
            self.can_return_loss = can_return_loss(base)
            if self.label_smoother is not None and base.__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
                self.label_smoother = _ShiftedLabels(self.label_smoother)

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)  # type: ignore[misc]
        model = self.model
        if self.args.ddp_find_unused_parameters is None and isinstance(model, LycoModel):
            base = model.get_base_model()
            if isinstance(base, PreTrainedModel):
                checkpointing = _checkpointing(base, self.args)
                for handler in args.get("kwargs_handlers", []):
                    if hasattr(handler, "find_unused_parameters"):
                        handler.find_unused_parameters = not checkpointing
        return args

    def _lyco_model(self, model: nn.Module | None = None) -> LycoModel | None:
        model = self.accelerator.unwrap_model(self.model if model is None else model)
        model = model._modules.get("_orig_mod", model)  # torch.compile's OptimizedModule
        return model if isinstance(model, LycoModel) and not is_sharded(model) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._lyco_model()
        if model is None or state_dict is not None:  # DeepSpeed / FSDP / SageMaker: Trainer's own path
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info(f"Saving adapter checkpoint to {output_dir}")
        model.save_pretrained(output_dir)
        # the rest as Trainer._save: tokenizer / processor, then the training arguments
        tokenizer = self.processing_class if hasattr(self, "processing_class") else self.tokenizer  # < 4.46
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        lyco_model = self._lyco_model(model)
        if lyco_model is None or not _has_adapter(lyco_model, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        names = copy_adapter_weights(lyco_model, resume_from_checkpoint)
        logger.info(f"Loaded adapter(s) {names} from {resume_from_checkpoint}")

    def _load_best_model(self) -> None:
        lyco_model = self._lyco_model()
        best = self.state.best_model_checkpoint
        if (
            lyco_model is None
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or not _has_adapter(lyco_model, best)
        ):
            return super()._load_best_model()
        logger.info(f"Loading best adapter from {best} (score: {self.state.best_metric}).")
        copy_adapter_weights(lyco_model, best)


def _checkpointing(base: PreTrainedModel, args: Any) -> bool:
    """Whether the base model or the training arguments turn activation checkpointing on (the names before
    transformers 5: ``is_gradient_checkpointing`` / ``gradient_checkpointing``)."""
    on_model = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    on_args = "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
    return bool(getattr(base, on_model, False) or getattr(args, on_args, False))


class _ShiftedLabels:
    """Trainer's label smoother with ``shift_labels=True``: next-token labels of a causal LM."""

    def __init__(self, smoother: Any) -> None:
        self.smoother = smoother

    def __call__(self, model_output: Any, labels: torch.Tensor, shift_labels: bool = False, **kwargs: Any) -> torch.Tensor:
        return self.smoother(model_output, labels, shift_labels=True, **kwargs)


class LycoTrainer(LycoTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints of a :class:`~lyco.LycoModel` hold only the adapter
    (``save_pretrained`` files) and whose ``resume_from_checkpoint`` / ``load_best_model_at_end`` load it."""
