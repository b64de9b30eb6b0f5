"""The digits demo: pretrain a CNN on 0–4, adapt it to 5–9 with full fine-tuning, LoHa and LoKr.

Each adapter is then saved (PEFT layout), reloaded into a fresh copy of the pretrained CNN and merged;
both must reproduce the trained adapter's logits, and disabling it must give back the pretrained CNN's.
:func:`run_demo` returns everything as data and prints nothing (progress bars aside); the CLI renders it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import torch
from torch import nn

import lyco

from .extras import INSTALL_HINT, missing_extras
from .plot import plot_losses
from .training import DigitsCNN, accuracy, count_params, load_digits_data, logits, num_threads, train

TARGETS = ["conv2", "fc1"]
HEAD = ["fc2"]
# Tolerances relative to the logit scale: float32 rounding of a merged weight grows with its magnitude.
RELOAD_RTOL = 1e-7
MERGE_RTOL = 1e-6


@dataclass(frozen=True)
class Settings:
    """Epochs and hyper-parameters of one demo run."""

    pretrain_epochs: int
    adapt_epochs: int
    batch_size: int = 32
    pretrain_lr: float = 3e-3
    full_lr: float = 3e-3
    adapter_lr: float = 1e-2
    rank: int = 4
    alpha: float = 4.0


FULL = Settings(pretrain_epochs=15, adapt_epochs=15)
QUICK = Settings(pretrain_epochs=5, adapt_epochs=5)


@dataclass
class MethodResult:
    """One adaptation method: sizes, accuracies on the 5–9 test set (in ``[0, 1]``), time and losses."""

    method: str
    trainable_params: int
    full_params: int
    acc_before: float
    acc_after: float
    train_seconds: float
    losses: list[float] = field(repr=False)
    adapter_dir: Path | None = None

    @property
    def fraction_of_full(self) -> float:
        """Trainable parameters relative to full fine-tuning."""
        return self.trainable_params / self.full_params


@dataclass
class CheckResult:
    """A numerical check: max |Δ| between two logit tensors ``(N, 10)`` against an absolute tolerance."""

    method: str
    check: str
    max_abs_diff: float
    tol: float

    @classmethod
    def compare(
        cls, method: str, check: str, got: torch.Tensor, expected: torch.Tensor, rtol: float
    ) -> CheckResult:
        """Check ``got`` against ``expected`` with ``tol = rtol · max(1, max |expected|)``."""
        scale = max(1.0, expected.abs().max().item())
        return cls(method, check, (got - expected).abs().max().item(), rtol * scale)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tol


@dataclass
class DemoResult:
    """Everything the demo measured; ``methods`` are full FT, LoHa, LoKr in that order."""

    pretrain_acc: float
    methods: list[MethodResult]
    checks: list[CheckResult]
    plot_path: Path
    out_dir: Path
    notes: list[str]
    total_seconds: float

    @property
    def checks_passed(self) -> bool:
        return all(c.passed for c in self.checks)


def adapter_configs(s: Settings) -> dict[str, lyco.AdapterConfig]:
    """LoHa and LoKr configs on ``TARGETS`` with the classifier head in ``modules_to_save``."""
    common = {"r": s.rank, "alpha": s.alpha, "target_modules": TARGETS, "modules_to_save": HEAD}
    return {
        "LoHa": lyco.LoHaConfig(**common, use_effective_conv2d=True),
        "LoKr": lyco.LoKrConfig(**common),
    }


def layer_summary(layer: nn.Module) -> str:
    """``"Linear 512→128"`` / ``"Conv2d 16→32 3×3"``."""
    if isinstance(layer, nn.Conv2d):
        return f"Conv2d {layer.in_channels}→{layer.out_channels} {'×'.join(map(str, layer.kernel_size))}"
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features}→{layer.out_features}"
    return type(layer).__name__


def describe_setup(base: nn.Module) -> list[str]:
    """Human-readable notes on what is adapted and why the head is trained in full."""
    modules = dict(base.named_modules())
    head = modules[HEAD[0]]
    targets = ", ".join(f"{name} ({layer_summary(modules[name])})" for name in TARGETS)
    return [
        f"LoHa/LoKr adapt {targets}; conv1 stays frozen (one input channel: an adapter would outgrow it).",
        f"The head {HEAD[0]} ({layer_summary(head)}, {count_params(head):,} params) is trained in full via "
        "modules_to_save: its outputs 5–9 were only ever pushed down in pretraining and need new weights "
        "and biases, while LoHa/LoKr change weights only.",
    ]


def verify_adapter(
    method: str, model: lyco.LycoModel, base: nn.Module, adapter_dir: Path, x: torch.Tensor
) -> list[CheckResult]:
    """Compare logits on ``x``: ``model`` with its adapter disabled vs ``base``; ``adapter_dir`` reloaded
    into a copy of ``base``, then merged, vs ``model``."""
    with model.disable_adapter():
        disabled = logits(model, x)
    base_check = CheckResult.compare(method, "disable_adapter = base", disabled, logits(base, x), RELOAD_RTOL)
    expected = logits(model, x)
    reloaded = lyco.LycoModel.from_pretrained(copy.deepcopy(base), adapter_dir)
    reload_check = CheckResult.compare(
        method, "save → from_pretrained", logits(reloaded, x), expected, RELOAD_RTOL
    )
    merged = reloaded.merge_and_unload()
    merge_check = CheckResult.compare(method, "merge_and_unload", logits(merged, x), expected, MERGE_RTOL)
    return [base_check, reload_check, merge_check]


def run_demo(
    out_dir: str | Path = "lyco_demo_out",
    *,
    quick: bool = False,
    seed: int = 0,
    threads: int = 1,
    progress: bool = True,
) -> DemoResult:
    """Run the whole demo, writing adapters and ``loss_curves.png`` under ``out_dir``.

    ``quick`` trains for fewer epochs; ``progress`` shows tqdm bars. ``threads`` caps torch's CPU threads:
    the tensors are tiny, so one thread is as fast as two, and two threads slow down ~50× when another
    process (e.g. a parallel test worker) busies a core.
    """
    if missing := missing_extras():
        raise ImportError(f"the demo needs {', '.join(missing)}: {INSTALL_HINT}")
    s = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = perf_counter()
    with num_threads(threads):
        data = load_digits_data(seed)
        torch.manual_seed(seed)
        base = DigitsCNN()
        pretrain_losses, _ = train(
            base, data.old_train, epochs=s.pretrain_epochs, lr=s.pretrain_lr, batch_size=s.batch_size,
            seed=seed, desc="pretrain 0–4", progress=progress,
        )  # fmt: skip
        base.requires_grad_(False)
        full_params = count_params(base)
        pretrain_acc = accuracy(base, data.old_test)
        acc_before = accuracy(base, data.new_test)

        def adapt(method: str, model: nn.Module, lr: float) -> MethodResult:
            losses, seconds = train(
                model, data.new_train, epochs=s.adapt_epochs, lr=lr, batch_size=s.batch_size,
                seed=seed, desc=f"{method} 5–9", progress=progress,
            )  # fmt: skip
            return MethodResult(
                method, count_params(model, trainable_only=True), full_params, acc_before,
                accuracy(model, data.new_test), seconds, losses,
            )  # fmt: skip

        methods = [adapt("Full fine-tune", copy.deepcopy(base).requires_grad_(True), s.full_lr)]
        checks: list[CheckResult] = []
        for method, config in adapter_configs(s).items():
            torch.manual_seed(seed)
            model = lyco.get_model(copy.deepcopy(base), config)
            result = adapt(method, model, s.adapter_lr)
            result.adapter_dir = out / method.lower()
            model.save_pretrained(result.adapter_dir)
            checks += verify_adapter(method, model, base, result.adapter_dir, data.new_test.x)
            methods.append(result)
        plot_path = plot_losses(
            out / "loss_curves.png", pretrain_losses, {m.method: m.losses for m in methods}
        )
    return DemoResult(
        pretrain_acc=pretrain_acc,
        methods=methods,
        checks=checks,
        plot_path=plot_path,
        out_dir=out,
        notes=describe_setup(base),
        total_seconds=perf_counter() - start,
    )


__all__ = ["CheckResult", "DemoResult", "MethodResult", "Settings", "run_demo"]
