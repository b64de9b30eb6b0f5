"""Why LoHa has custom autograd: bytes saved for backward and time, custom vs plain autograd.

Plain autograd of ``(w1_a @ w1_b) * (w2_a @ w2_b)`` keeps both dense ``(out, in)`` products alive until
backward; the custom functions keep only the factors and recompute the products. Measured in one run::

    python benchmarks/loha_autograd.py [--out 1024] [--in 1024] [--r 8] [--kernel 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from lyco.ops.hadamard import hada_delta, hada_delta_cp, hada_delta_naive


def saved_bytes_and_time(fn, params: list[torch.Tensor], repeats: int = 5) -> tuple[int, float]:
    """Bytes of tensors saved for backward by one call of ``fn(*params)``; median fwd+bwd seconds."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*params).sum().backward()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*params).sum().backward()
        times.append(time.perf_counter() - start)
    return total, sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=1024)
    ap.add_argument("--in", dest="in_", type=int, default=1024)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--kernel", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, requires_grad=True)

    plain = [rand(a.out, a.r), rand(a.r, a.in_), rand(a.out, a.r), rand(a.r, a.in_)]
    k = (a.kernel, a.kernel)
    cp = [rand(a.r, a.r, *k), rand(a.r, a.out), rand(a.r, a.in_), rand(a.r, a.r, *k), rand(a.r, a.out), rand(a.r, a.in_)]
    cases = [
        ("linear", plain, hada_delta, hada_delta_naive),
        (f"conv CP {k}", cp, hada_delta_cp,
         lambda t1, w1a, w1b, t2, w2a, w2b: hada_delta_naive(w1a, w1b, w2a, w2b, t1, t2)),
    ]  # fmt: skip
    print(f"LoHa delta {a.out}x{a.in_}, r={a.r}: bytes saved for backward and fwd+bwd time (median of 5)")
    print(f"{'case':<16}{'custom MiB':>12}{'plain MiB':>12}{'ratio':>8}{'custom ms':>12}{'plain ms':>11}")
    for name, params, custom, naive in cases:
        cb, ct = saved_bytes_and_time(custom, params)
        nb, nt = saved_bytes_and_time(naive, params)
        print(f"{name:<16}{cb / 2**20:>12.3f}{nb / 2**20:>12.3f}{nb / max(cb, 1):>7.0f}x{ct * 1e3:>12.2f}{nt * 1e3:>11.2f}")


if __name__ == "__main__":
    main()
