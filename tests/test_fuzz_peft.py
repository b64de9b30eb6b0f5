"""Fuzzed PEFT folders through every public entry point: only lyco errors (or documented warnings) come out,
and a failed load leaves the model exactly as it was.

Mutations (seeded, 600 folders): tensors (random shapes and ranks, 0-dim, empty, other dtypes, NaN/Inf,
missing, extra, renamed and unprefixed keys), config bytes (truncated, flipped, non-UTF-8, deeply nested,
not an object) and config field types (every field set to values of the wrong type or range). Entry points:
``LycoModel.from_pretrained``, ``load_adapter``, ``read_peft_adapter``, ``read_adapter`` and the
``lyco inspect`` / ``convert`` / ``merge`` commands.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lyco
from lyco import cli
from lyco.formats import read_adapter, read_peft_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
N_FOLDERS = 600



class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, 4, 4, 4)
        y = self.conv(x).flatten(2).mean(-1)  # (N, 8)
        z = self.c1(x.flatten(2)).flatten(1)[:, :16]
        return self.head(self.fc(z + y.repeat(1, 2)))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


SOURCES = {
    "loha": lambda: lyco.LoHaConfig(r=2, alpha=3, target_modules=["fc", "conv", "c1"], use_effective_conv2d=True,
                                    init_weights=False, rank_pattern={"fc": 3}, modules_to_save=["head"]),
    "lokr": lambda: lyco.LoKrConfig(r=2, alpha=3, target_modules=["fc", "conv", "c1"], decompose_both=True,
                                    use_effective_conv2d=True, init_weights=False, alpha_pattern={"conv": 1.5}),
}  # fmt: skip
FIELD_VALUES = [None, True, False, 0, -1, 1, 2.5, float("nan"), "abc", "", "(", [], ["fc"], [1, 2], ["(unclosed"],
                {}, {"fc": -1}, {"fc": "x"}, {"(": 1}, {"fc": None}, [[["deep"]]], 10**30]  # fmt: skip
TEXT_FIELDS = ["1e400", "-1e400", "NaN", "Infinity", "9" * 400]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    out = {}
    for name, make in SOURCES.items():
        lyco.get_model(net(), make()).save_pretrained(root / name)
        out[name] = root / name
    base = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net().state_dict().items()}, str(base))
    out["base"] = base
    return out


def random_tensor(rng: random.Random) -> torch.Tensor:
    kind = rng.choice(["shape", "0dim", "empty", "dtype", "nan", "huge_rank"])
    if kind == "0dim":
        return torch.tensor(rng.random())
    if kind == "empty":
        return torch.zeros(rng.choice([(0,), (0, 4), (4, 0), (2, 0, 3)]))
    if kind == "dtype":
        dtype = rng.choice([torch.int32, torch.int64, torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float64])
        return torch.ones(rng.choice([(4, 4), (2, 16), (16, 2)])).to(dtype)
    if kind == "nan":
        t = torch.randn(rng.choice([(4, 4), (16, 2), (2, 16)]))
        t.view(-1)[0] = rng.choice([float("nan"), float("inf")])
        return t
    if kind == "huge_rank":
        return torch.randn(rng.choice([(1, 4096), (4096, 1), (64, 1, 1, 1, 1)]))
    ndim = rng.randint(1, 5)
    return torch.randn([rng.randint(1, 5) for _ in range(ndim)])


def mutate_tensors(folder: Path, rng: random.Random) -> str:
    tensors = load_file(folder / WEIGHTS)
    keys = sorted(tensors)
    what = rng.choice(["replace", "replace", "delete", "extra", "rename", "unprefix", "reshape_core"])
    key = rng.choice(keys)
    if what == "replace":
        tensors[key] = random_tensor(rng)
    elif what == "delete":
        del tensors[key]
    elif what == "extra":
        name = rng.choice(["base_model.model.fc.lokr_w1", "base_model.model.fc.hada_w1_a", "base_model.model.nope.x",
                           "base_model.model.head.weight", "garbage", "base_model.model.c1.hada_t1"])  # fmt: skip
        tensors[name] = random_tensor(rng)
    elif what == "rename":
        tensors[key + "_x"] = tensors.pop(key)
    elif what == "unprefix":
        tensors[key.removeprefix("base_model.model.")] = tensors.pop(key)
    else:
        t = tensors[key]
        tensors[key] = t.reshape(*t.shape, 1) if t.dim() < 5 else t.flatten()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS))
    return f"tensors:{what}:{key}"


def mutate_config(folder: Path, rng: random.Random) -> str:
    path = folder / CONFIG
    raw = path.read_bytes()
    what = rng.choice(["field", "field", "field", "text_field", "delete", "truncate", "flip", "utf8", "nest", "array"])
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # an earlier mutation broke it already
        data, what = {}, "truncate"
    if not isinstance(data, dict) or not data:
        data, what = {}, "truncate" if what in ("field", "text_field", "delete", "array") else what
    if what in ("field", "text_field", "delete"):
        field = rng.choice(sorted(data))
        if what == "delete":
            del data[field]
            path.write_text(json.dumps(data))
        elif what == "field":
            data[field] = copy.deepcopy(rng.choice(FIELD_VALUES))
            path.write_text(json.dumps(data))
        else:
            data[field] = "__TEXT__"
            path.write_text(json.dumps(data).replace('"__TEXT__"', rng.choice(TEXT_FIELDS)))
        return f"config:{what}:{field}"
    if what == "truncate":
        path.write_bytes(raw[: rng.randrange(max(len(raw), 1))])
    elif what == "flip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4) if b else 0):
            b[rng.randrange(len(b))] = rng.randrange(256)
        path.write_bytes(bytes(b))
    elif what == "utf8":
        path.write_bytes(raw[:10] + b"\xff\xfe\xc3" + raw[10:])
    elif what == "nest":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        path.write_text(json.dumps([data]))
    return f"config:{what}"


def mutated(sources: dict[str, Path], tmp: Path, i: int) -> tuple[Path, str]:
    rng = random.Random(i)
    kind = rng.choice(["loha", "lokr"])
    folder = tmp / f"m{i}"
    shutil.copytree(sources[kind], folder)
    what = []
    for _ in range(rng.choice([1, 1, 2])):
        what.append(mutate_tensors(folder, rng) if rng.random() < 0.55 else mutate_config(folder, rng))
    return folder, f"{kind} #{i}: " + ", ".join(what)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module: nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys(), what
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{what}: {k} changed"


def expect_lyco(what: str, call, *args, **kwargs):
    """Run ``call(*args, **kwargs)``: success or a LycoError; anything else fails the test naming the mutation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call(*args, **kwargs), None
    except lyco.LycoError as exc:
        return None, exc
    except Exception as exc:  # pragma: no cover - this is what the fuzzer looks for
        raise AssertionError(f"{what}: {type(exc).__name__} escaped: {exc}") from exc


@pytest.mark.parametrize("chunk", range(6))
def test_fuzzed_peft_folders(sources, tmp_path, chunk, capsys):
    per = N_FOLDERS // 6
    base_model = lyco.get_model(net(), lyco.LoKrConfig(r=2, target_modules=["fc"], init_weights=False))
    for i in range(chunk * per, (chunk + 1) * per):
        folder, what = mutated(sources, tmp_path, i)
        fresh = net()
        before = state(fresh)
        _, err = expect_lyco(what, lyco.LycoModel.from_pretrained, fresh, folder)
        if err is not None:
            assert_same_state(fresh, before, what)
        before, configs = state(base_model), dict(base_model.peft_config)
        _, err = expect_lyco(what, base_model.load_adapter, folder, "x")
        if err is None:
            base_model.delete_adapter("x")
        assert_same_state(base_model, before, what)
        assert base_model.peft_config.keys() == configs.keys(), what
        expect_lyco(what, read_peft_adapter, folder)
        expect_lyco(what, read_peft_adapter, folder, model=net())
        expect_lyco(what, read_adapter, folder)
        for argv in (["inspect", str(folder)], ["inspect", str(folder), "--base", str(sources["base"])],
                     ["convert", str(folder), str(tmp_path / f"c{i}.safetensors")],
                     ["merge", str(sources["base"]), str(folder), str(tmp_path / f"g{i}.safetensors"), "--no-progress"]):  # fmt: skip
            rc = cli.main(argv)
            err_text = capsys.readouterr().err
            assert rc in (0, 1) and "Traceback" not in err_text, f"{what}: lyco {argv[0]} → {rc}: {err_text[-500:]}"
        shutil.rmtree(folder)
