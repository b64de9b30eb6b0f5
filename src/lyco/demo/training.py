"""Data, model and training loop of the digits demo (scikit-learn's bundled 8×8 digits, no download)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Split:
    """Images ``x (N, 1, 8, 8)`` float32 in ``[0, 1]`` and labels ``y (N,)`` int64 in ``0..9``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DigitsData:
    """Stratified train/test split of the digits, each side divided into classes 0–4 and 5–9."""

    old_train: Split
    old_test: Split
    new_train: Split
    new_test: Split


def load_digits_data(seed: int, test_size: float = 0.25) -> DigitsData:
    """Load sklearn's 1,797 digits, split train/test (stratified, ``seed``), then by class < 5."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_size, random_state=seed, stratify=y.numpy()
    )

    def part(idx: torch.Tensor, old: bool) -> Split:
        keep = idx[(y[idx] < 5) == old]
        return Split(x[keep], y[keep])

    train, test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return DigitsData(part(train, True), part(test, True), part(train, False), part(test, False))


class DigitsCNN(nn.Module):
    """``(N, 1, 8, 8) -> (N, 10)`` logits: conv1 (1→16) → conv2 (16→32) → pool → fc1 (512→128) → fc2 (128→10)."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool,
) -> tuple[list[float], float]:
    """Train the parameters with ``requires_grad`` (AdamW, cross-entropy); return (per-step losses, seconds)."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(data) / batch_size)
    losses: list[float] = []
    model.train()
    start = perf_counter()
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=True) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(len(data), generator=generator).split(batch_size):
                loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update()
    return losses, perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    """Top-1 accuracy in ``[0, 1]`` over all 10 classes (eval mode)."""
    model.eval()
    return (model(data.x).argmax(-1) == data.y).float().mean().item()


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits ``(N, 10)``."""
    model.eval()
    return model(x)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Limit torch's intra-op threads to ``n`` (never more than now) inside the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
