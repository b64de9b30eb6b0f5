"""Pure tensor maths (no nn.Module state, no configs)."""

from .factorize import (
    LoHaPlan,
    LoKrPlan,
    factorization,
    infer_loha_plan,
    infer_lokr_plan,
    plan_loha,
    plan_lokr,
)
from .hadamard import hada_delta, hada_delta_cp
from .kron import make_kron
from .tucker import cp_rebuild

__all__ = [
    "LoHaPlan", "LoKrPlan", "cp_rebuild", "factorization", "hada_delta", "hada_delta_cp",
    "infer_loha_plan", "infer_lokr_plan", "make_kron", "plan_loha", "plan_lokr",
]  # fmt: skip
