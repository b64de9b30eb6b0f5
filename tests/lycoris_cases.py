"""Shared pieces of the LyCORIS-file tests: a small model whose layers cover Linear, Conv2d 3×3 and 1×1,
Conv1d and a Conv2d 4→8 (whose LoKr split depends on the factor), and lycoris-lora used as an oracle."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

ATOL = 1e-5  # fp32 outputs of two implementations of the same ΔW
MOVED = 1e-4  # an adapter must move the output by more than this, or a comparison proves nothing
LAYERS = ["net.small", "net.conv", "net.pw", "net.conv1d", "net.fc"]


class Net(nn.Module):
    """Conv2d 4→8 k3 → Conv2d 8→32 k3 → Conv2d 32→32 1×1 → Conv1d 32→64 k3 → Linear 64→48."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(4, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 32, 1)
        self.conv1d = nn.Conv1d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pw(self.conv(self.small(x).relu()).relu()).relu().flatten(2)
        return self.fc(self.conv1d(h).relu().mean(-1))


class Root(nn.Module):
    """lycoris-lora adapts the children of the container class named in its preset: here ``Net``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


X = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))


def base_root() -> Root:
    torch.manual_seed(0)
    return Root()


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def lycoris_net(base: nn.Module, exclude: tuple[str, ...] = (), seed: int = 1, **kwargs):
    """A lycoris-lora network on a deep copy of ``base`` with random (non-zero) weights: ``(model, net)``."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    model = copy.deepcopy(base)
    # apply_preset is global class state: set every key the tests depend on, every time
    LycorisNetwork.apply_preset({"target_module": ["Net"], "target_name": [], "exclude_name": list(exclude)})
    net = create_lycoris(model, 1.0, **kwargs)
    net.apply_to()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)  # lycoris' LoKr init zeroes w2
    return model, net


def lycoris_load(base: nn.Module, path) -> nn.Module:
    """lycoris-lora's own loader on a deep copy of ``base``."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    LycorisNetwork.apply_preset({"target_module": ["Net"], "target_name": [], "exclude_name": []})
    model = copy.deepcopy(base)
    net, _ = create_lycoris_from_weights(1.0, str(path), model)
    net.apply_to()
    return model
