"""The logic behind the adapter-file commands (lyco.tools), on AdapterFile objects and tiny safetensors files."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lyco.errors import FormatError, ShapeMismatchError
from lyco.formats.adapterfile import AdapterFile, ModuleAdapter
from lyco.formats.dispatch import source_format, target_format
from lyco.formats.stream import StreamingWriter, read_index
from lyco.methods.lokr import LoKrAdapter
from lyco.ops.kron import make_kron
from lyco.ops.lowrank import relative_error, svd_tail_error
from lyco.tools.base_weights import BaseIndex, attach_base, index_base, resolve_names
from lyco.tools.convert import compare_adapters
from lyco.tools.describe import RULE_ALPHA, RULE_NO_ALPHA, RULE_UNRANKED, describe
from lyco.tools.extract import extract_files, extract_module
from lyco.tools.merge import merge_file
from lyco.tools.resize import resize_adapter, to_lora

RULE_FULL_LOKR = RULE_UNRANKED.format(LoKrAdapter.unranked)

G = torch.Generator().manual_seed(0)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def base_state() -> dict[str, torch.Tensor]:
    """A tiny 'model': one linear-like weight per layer, a conv, a head, biases and a norm."""
    return {
        "layers.0.q.weight": rnd(16, 12), "layers.0.q.bias": rnd(16), "layers.1.q.weight": rnd(16, 12),
        "conv.weight": rnd(8, 4, 3, 3), "norm.weight": rnd(16), "head.weight": rnd(4, 16),
    }  # fmt: skip


def lokr(out_l, in_l, out_r, in_r, r=None, alpha=None, kernel=()) -> ModuleAdapter:
    t = {"lokr_w1": rnd(out_l, in_l)}
    if r is None:
        t["lokr_w2"] = rnd(out_r, in_r, *kernel)
    else:
        t["lokr_w2_a"], t["lokr_w2_b"] = rnd(out_r, r), rnd(r, in_r * math.prod(kernel))
    return ModuleAdapter("lokr", t, alpha=alpha, weight_shape=(out_l * out_r, in_l * in_r, *kernel))


def loha(out, in_, r, alpha=None, kernel=()) -> ModuleAdapter:
    flat = in_ * math.prod(kernel)
    t = {"hada_w1_a": rnd(out, r), "hada_w1_b": rnd(r, flat), "hada_w2_a": rnd(out, r), "hada_w2_b": rnd(r, flat)}
    return ModuleAdapter("loha", t, alpha=alpha, weight_shape=(out, in_, *kernel))


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    save_file(base_state(), path, metadata={"format": "pt", "note": "tiny"})
    return path


def tuned_file(tmp_path: Path, base: Path, deltas: dict[str, torch.Tensor], name: str = "tuned") -> Path:
    state = load_file(base)
    for module, delta in deltas.items():
        state[f"{module}.weight"] = state[f"{module}.weight"] + delta
    path = tmp_path / f"{name}.safetensors"
    save_file(state, path)
    return path


# -- extract --------------------------------------------------------------------------------------------
def test_extract_lokr_recovers_exact_kronecker_products(tmp_path: Path, base_file: Path) -> None:
    deltas = {
        "layers.0.q": make_kron(rnd(4, 3), rnd(4, 4)),  # full factors (r=2 ≥ max(4, 4)/2)
        "layers.1.q": make_kron(rnd(4, 3), rnd(4, 1) @ rnd(1, 4)),  # rank-1 w2 in a rank-1 plan
        "conv": make_kron(rnd(2, 2), rnd(4, 2, 3, 3)),
    }
    tuned = tuned_file(tmp_path, base_file, deltas)
    for rank, want_full in ((2, True), (1, False)):
        af, results = extract_files(base_file, tuned, "lokr", rank, include="layers" if rank == 1 else None)
        errors = {r.name: r.error for r in results}
        if rank == 2:
            assert set(errors) == set(deltas)  # head/norm/bias unchanged: skipped
            assert all(e < 1e-5 for e in errors.values()), errors
            assert af.modules["conv"].tensors["lokr_w2"].shape == (4, 2, 3, 3)
        else:
            assert errors["layers.1.q"] < 1e-5, errors
        assert ("lokr_w2" in af.modules["layers.0.q"].tensors) is want_full
        for name, m in af.modules.items():  # the adapter's own ΔW is what was measured
            assert relative_error(deltas[name], m.delta_weight()) == pytest.approx(errors[name], abs=1e-6)
    assert af.metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(af.metadata["ss_network_args"])["algo"] == "lokr"


def test_extract_lokr_error_on_a_random_matrix_decreases_with_rank() -> None:
    delta = rnd(64, 48)
    # factor 2: w1 (2, 2) full, w2 (32, 24) rank-r: the truncation error shrinks as r grows
    errors = [relative_error(delta, extract_module(delta, "lokr", r, factor=2).delta_weight()) for r in (1, 2, 4, 8)]
    assert all(0 < b < a < 1 for a, b in itertools.pairwise(errors)), errors


def test_extract_loha_error_decreases_with_rank_and_is_deterministic() -> None:
    delta = rnd(24, 20)
    errors = []
    for r in (1, 2, 4):
        m = extract_module(delta, "loha", r, steps=150)
        errors.append(relative_error(delta, m.delta_weight()))
        assert errors[-1] <= svd_tail_error(delta, r) + 1e-6  # never worse than the SVD start
    assert errors[0] > errors[1] > errors[2], errors
    again = extract_module(delta, "loha", 2, steps=150)
    first = extract_module(delta, "loha", 2, steps=150)
    assert all(torch.equal(again.tensors[k], first.tensors[k]) for k in first.tensors)


def test_extract_loha_conv_keeps_the_layer_shape() -> None:
    delta = rnd(8, 4, 3, 3)
    m = extract_module(delta, "loha", 2, steps=50)
    assert m.weight_shape == (8, 4, 3, 3) and m.tensors["hada_w1_b"].shape == (2, 36)
    assert relative_error(delta, m.delta_weight()) < 1


def test_extract_full_is_exact_and_carries_bias_differences(tmp_path: Path, base_file: Path) -> None:
    """Full: diff = the weight difference; diff_b only where ``<module>.bias`` differs too; merging it back
    gives the tuned state dict."""
    deltas = {"layers.0.q": rnd(16, 12), "conv": rnd(8, 4, 3, 3)}
    tuned = tuned_file(tmp_path, base_file, deltas)
    state = load_file(tuned)
    state["layers.0.q.bias"] = state["layers.0.q.bias"] + rnd(16)
    save_file(state, tuned)
    af, results = extract_files(base_file, tuned, "full", 1)
    errors = {r.name: r.error for r in results}
    assert set(errors) == {"layers.0.q", "conv"} and max(errors.values()) < 1e-7, errors  # fp32 rounding only
    assert set(af.modules["layers.0.q"].tensors) == {"diff", "diff_b"} and set(af.modules["conv"].tensors) == {"diff"}
    merge_file(base_file, af, tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    for key, want in state.items():
        torch.testing.assert_close(back[key], want, atol=1e-6, rtol=0)


def test_to_lora_notes_a_dropped_bias_delta() -> None:
    full = ModuleAdapter("full", {"diff": rnd(8, 6), "diff_b": rnd(8)}, weight_shape=(8, 6))
    _, results = to_lora(AdapterFile({"a": full, "b": loha(8, 6, 2)}), 6)
    notes = {r.name: r.note for r in results}
    assert notes["a"].startswith("bias delta dropped") and notes["b"] == ""
    assert results[0].error < 1e-6  # rank 6 = full rank: the weight part is exact


def test_extract_nothing_to_do_is_an_error(base_file: Path) -> None:
    with pytest.raises(FormatError, match="nothing to extract"):
        extract_files(base_file, base_file, "lokr", 2)


# -- merge ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_streams_base_plus_delta_and_copies_the_rest(tmp_path: Path, dtype: torch.dtype) -> None:
    state = {k: v.to(dtype) for k, v in base_state().items()}
    base = tmp_path / "base.safetensors"
    save_file(state, base, metadata={"note": "tiny"})
    af = AdapterFile(
        {"lycoris_layers_0_q": lokr(4, 3, 4, 4, r=2, alpha=1.0), "conv": loha(8, 4, 2, kernel=(3, 3))},
        resolved=False,
    )
    out = tmp_path / "merged.safetensors"
    report = merge_file(base, af, out, scale=0.5)
    assert sorted(report.merged) == ["conv", "layers.0.q"] and report.copied == len(state) - 2
    merged = load_file(out)
    assert list(merged) == list(load_file(base))
    for key, tensor in state.items():
        assert merged[key].dtype == dtype
        if key == "layers.0.q.weight":
            delta = af.modules["lycoris_layers_0_q"].delta_weight()
        elif key == "conv.weight":
            delta = af.modules["conv"].delta_weight()
        else:
            assert torch.equal(merged[key], tensor), key
            continue
        torch.testing.assert_close(merged[key], (tensor.float() + 0.5 * delta).to(dtype), rtol=0, atol=0)
    assert read_index(out)[1]["note"] == "tiny"


def test_merge_into_a_folder_of_shards(tmp_path: Path) -> None:
    base = tmp_path / "model"
    base.mkdir()
    state = base_state()
    keys = list(state)
    save_file({k: state[k] for k in keys[:3]}, base / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[3:]}, base / "model-00002-of-00002.safetensors")
    (base / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    af = AdapterFile({"layers.0.q": lokr(4, 3, 4, 4, r=2), "conv": loha(8, 4, 2, kernel=(3, 3))})
    report = merge_file(base, af, tmp_path / "out")
    assert sorted(report.merged) == ["conv", "layers.0.q"] and report.copied == len(state) - 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in base.iterdir())
    merged = {**load_file(tmp_path / "out" / "model-00001-of-00002.safetensors"),
              **load_file(tmp_path / "out" / "model-00002-of-00002.safetensors")}  # fmt: skip
    torch.testing.assert_close(merged["conv.weight"], state["conv.weight"] + af.modules["conv"].delta_weight())
    assert torch.equal(merged["head.weight"], state["head.weight"])


def test_merge_transposed_conv1d_weights(tmp_path: Path) -> None:
    """GPT-2 style: every projection stored (in, out); the square one follows the others."""
    state = {"h.c_attn.weight": rnd(12, 36), "h.c_proj.weight": rnd(12, 12)}
    base = tmp_path / "gpt.safetensors"
    save_file(state, base)
    af = AdapterFile({"h.c_attn": lokr(4, 3, 9, 4, r=1), "h.c_proj": lokr(3, 3, 4, 4, r=1)})
    af.modules["h.c_attn"].weight_shape = af.modules["h.c_proj"].weight_shape = None
    report = merge_file(base, af, tmp_path / "m.safetensors")
    assert report.transposed == ["h.c_attn", "h.c_proj"]
    merged = load_file(tmp_path / "m.safetensors")
    for name in ("h.c_attn", "h.c_proj"):
        want = state[f"{name}.weight"] + af.modules[name].delta_weight(state[f"{name}.weight"].shape[::-1]).T
        torch.testing.assert_close(merged[f"{name}.weight"], want)


def test_merge_full_changes_weight_and_bias(tmp_path: Path, base_file: Path) -> None:
    """Full's diff_b lands in ``<module>.bias``; a diff_b for a base without that bias fails before writing."""
    state = load_file(base_file)
    full = ModuleAdapter("full", {"diff": rnd(16, 12), "diff_b": rnd(16)}, alpha=None, weight_shape=(16, 12))
    report = merge_file(base_file, AdapterFile({"layers.0.q": full}), tmp_path / "m.safetensors", scale=0.5)
    assert report.merged == ["layers.0.q"] and report.merged_bias == ["layers.0.q"]
    assert report.copied == len(state) - 2
    merged = load_file(tmp_path / "m.safetensors")
    torch.testing.assert_close(merged["layers.0.q.weight"], state["layers.0.q.weight"] + 0.5 * full.tensors["diff"])
    torch.testing.assert_close(merged["layers.0.q.bias"], state["layers.0.q.bias"] + 0.5 * full.tensors["diff_b"])
    no_bias = AdapterFile({"layers.1.q": full})
    with pytest.raises(FormatError, match=r"layers\.1\.q.*no layers\.1\.q\.bias"):
        merge_file(base_file, no_bias, tmp_path / "n.safetensors")
    assert not list(tmp_path.glob("n*")) and not list(tmp_path.glob(".n*"))


def test_merge_unknown_module_fails_before_writing(tmp_path: Path, base_file: Path) -> None:
    af = AdapterFile({"layers.9.q": lokr(4, 3, 4, 4)})
    with pytest.raises(FormatError, match=r"not found.*layers.9.q.*layers.1.q"):
        merge_file(base_file, af, tmp_path / "out.safetensors")
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))
    with pytest.raises(FormatError, match="overwrite"):
        merge_file(base_file, af, base_file)


# -- resize / to-lora -----------------------------------------------------------------------------------
def test_resize_lokr_truncates_by_svd_and_keeps_the_scale() -> None:
    m = lokr(4, 3, 8, 8, r=4, alpha=2.0)  # scale 0.5
    af, [res] = resize_adapter(AdapterFile({"x": m}), 2)
    new = af.modules["x"]
    assert new.rank == 2 and new.scale() == pytest.approx(0.5) and new.alpha == pytest.approx(1.0)
    w2 = m.tensors["lokr_w2_a"] @ m.tensors["lokr_w2_b"]
    assert res.error == pytest.approx(svd_tail_error(w2, 2), rel=1e-4)  # kron(w1, ·) scales errors uniformly
    assert res.error == pytest.approx(relative_error(m.delta_weight(), new.delta_weight()), rel=1e-6)
    same, [r2] = resize_adapter(AdapterFile({"x": m}), 4)
    assert same.modules["x"] is m and r2.error == 0 and "unchanged" in r2.note


def test_resize_lora_and_full_lokr() -> None:
    lora = ModuleAdapter("lora", {"lora_down": rnd(4, 6, 3, 3), "lora_up": rnd(8, 4, 1, 1)}, alpha=8.0)
    full = lokr(2, 2, 4, 4)
    af, results = resize_adapter(AdapterFile({"a": lora, "b": full}), 2)
    assert af.modules["a"].tensors["lora_down"].shape == (2, 6, 3, 3)
    assert af.modules["a"].tensors["lora_up"].shape == (8, 2, 1, 1)
    assert af.modules["a"].scale() == pytest.approx(2.0)
    want = svd_tail_error(lora.delta_weight((8, 6, 3, 3)).flatten(1), 2)
    assert results[0].error == pytest.approx(want, rel=1e-4)
    assert af.modules["b"] is full and "full" in results[1].note


def test_resize_loha_exact_when_the_branches_have_the_target_rank() -> None:
    m = loha(12, 10, 4, alpha=4.0)
    for k in ("hada_w1_a", "hada_w2_a"):
        m.tensors[k][:, 2:] = 0  # branches of rank 2 stored at rank 4
    af, [res] = resize_adapter(AdapterFile({"x": m}), 2, steps=20)
    assert af.modules["x"].rank == 2 and res.error < 1e-5
    dense = loha(12, 10, 4)
    _, [res_dense] = resize_adapter(AdapterFile({"x": dense}), 2, steps=100)
    assert 0 < res_dense.error < 1


def test_to_lora_is_the_svd_of_each_delta() -> None:
    src = AdapterFile(
        {"lin": lokr(4, 3, 4, 4, r=2, alpha=4.0), "conv": loha(8, 4, 2, alpha=1.0, kernel=(3, 3))},
        metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": "{}", "ss_other": "kept"},
    )
    errors = {}
    for rank in (1, 4, 64):
        af, results = to_lora(src, rank)
        errors[rank] = {r.name: r.error for r in results}
        for name, m in af.modules.items():
            assert m.algo == "lora" and m.scale() == 1.0
            delta = src.modules[name].delta_weight()
            assert errors[rank][name] == pytest.approx(svd_tail_error(delta.flatten(1), rank), rel=1e-4, abs=1e-6)
    conv = af.modules["conv"].tensors
    assert conv["lora_down"].shape == (8, 4, 3, 3) and conv["lora_up"].shape == (8, 8, 1, 1)  # rank ≤ min(out, in·k)
    assert all(errors[1][n] > errors[4][n] > errors[64][n] for n in src.modules)
    assert max(errors[64].values()) < 1e-5
    assert af.metadata["ss_network_module"] == "networks.lora" and af.metadata["ss_other"] == "kept"


# -- inspect / convert helpers --------------------------------------------------------------------------
def test_describe_reports_rules_producer_and_json(tmp_path: Path) -> None:
    af = AdapterFile(
        {"a": lokr(4, 3, 4, 4, r=2, alpha=1.0), "b": lokr(2, 2, 4, 4, alpha=9999999999.0), "c": loha(8, 8, 2)},
        convention="kohya", metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'},
    )  # fmt: skip
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"x" * 123)
    report = describe(af, path)
    assert report.rules == {RULE_ALPHA: 1, RULE_FULL_LOKR: 1, RULE_NO_ALPHA: 1}
    assert [m.scale for m in report.modules] == [0.5, 1.0, 1.0]
    assert "lycoris.kohya" in report.producer and report.size_bytes == 123
    assert report.algos == ["loha", "lokr"] and report.network_args == {"algo": "lokr"}
    assert report.num_params == af.num_params()
    json.dumps(report.to_json())


def test_compare_adapters_matches_names_across_conventions() -> None:
    a = AdapterFile({"layers.0.q": lokr(4, 3, 4, 4, r=2)})
    b = AdapterFile({"lycoris_layers_0_q": a.modules["layers.0.q"]}, resolved=False)
    assert compare_adapters(a, b) == (0.0, 1)


# -- base index and name resolution ---------------------------------------------------------------------
def test_resolve_names_rules_and_errors() -> None:
    modules = ["unet.down_blocks.0.proj_in", "unet.mid_block.proj", "te.layers.0.fc", "x.a_b.c", "x.a.b_c"]
    got = resolve_names(["lora_unet_down_blocks_0_proj_in", "mid_block.proj", "te.layers.0.fc"], modules)
    assert got == {
        "lora_unet_down_blocks_0_proj_in": "unet.down_blocks.0.proj_in",
        "mid_block.proj": "unet.mid_block.proj",
        "te.layers.0.fc": "te.layers.0.fc",
    }
    with pytest.raises(FormatError, match="several"):
        resolve_names(["x_a_b_c"], modules)
    with pytest.raises(FormatError, match=r"not found.*closest"):
        resolve_names(["lora_unet_down_blocks_1_proj_in"], modules)


def test_index_base_file_dir_and_config(tmp_path: Path, base_file: Path) -> None:
    idx = index_base(base_file)
    assert idx.weights["conv"] == (8, 4, 3, 3) and "layers.0.q.bias" not in idx.weights
    shards = tmp_path / "model"
    shards.mkdir()
    save_file({"a.weight": rnd(2, 2)}, shards / "model-00001.safetensors")
    save_file({"b.weight": rnd(3, 3)}, shards / "model-00002.safetensors")
    assert set(index_base(shards).weights) == {"a", "b"}
    pytest.importorskip("transformers")
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
           "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 10}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    idx = index_base(tmp_path / "config.json")
    assert idx.weights["model.layers.0.self_attn.q_proj"] == (16, 16)
    with pytest.raises(FormatError, match="no such file"):
        index_base(tmp_path / "missing.safetensors")


def test_attach_base_sets_shapes_and_checks_fit() -> None:
    base = BaseIndex({"blk.conv": (8, 4, 3, 3), "blk.fc": (16, 12)}, {}, "base")
    m = lokr(2, 2, 4, 2, kernel=(3, 3))
    m.weight_shape = None
    af, flipped = attach_base(AdapterFile({"lycoris_blk_conv": m}, resolved=False), base)
    assert af.modules["blk.conv"].weight_shape == (8, 4, 3, 3) and af.resolved and not flipped
    with pytest.raises(ShapeMismatchError, match="does not fit"):
        attach_base(AdapterFile({"blk.fc": lokr(2, 2, 4, 4)}), base)


# -- file plumbing ---------------------------------------------------------------------------------------
def test_streaming_writer_checks_order_shapes_and_completeness(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    specs = {"a": ("BF16", (2, 3)), "b": ("F32", ())}
    with StreamingWriter(path, specs, {"k": "v"}) as w:
        w.write("a", torch.ones(2, 3, dtype=torch.bfloat16))
        w.write("b", torch.tensor(2.0))
    assert torch.equal(load_file(path)["a"], torch.ones(2, 3, dtype=torch.bfloat16))
    assert read_index(path) == ({"a": ("BF16", (2, 3)), "b": ("F32", ())}, {"k": "v"})
    for bad in (
        lambda w: w.write("b", torch.tensor(1.0)),
        lambda w: w.write("a", torch.ones(2, 3)),
        lambda w: w.write("a", torch.ones(2, 3, dtype=torch.bfloat16)),
    ):
        with pytest.raises(FormatError), StreamingWriter(tmp_path / "bad.safetensors", specs) as w:
            bad(w)
        assert not list(tmp_path.glob("*bad*"))


def test_dispatch_formats(tmp_path: Path) -> None:
    assert target_format(tmp_path / "x.safetensors") == "lycoris"
    assert target_format(tmp_path / "dir") == "peft"
    with pytest.raises(FormatError, match="unknown output format"):
        target_format("x", to="onnx")
    assert source_format(tmp_path) == "peft"
    with pytest.raises(FormatError, match="no such"):
        source_format(tmp_path / "missing")
