"""Which modules get adapters (target/exclude/layers), per-layer rank/alpha, default targets."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lyco
from lyco.targeting import DIFFUSERS_ATTENTION_TARGETS, default_target_modules, pattern_value

ATOL = 1e-5
METHODS = [lyco.LoHaConfig, lyco.LoKrConfig]


class Attn(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x))


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.attn = Attn(d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))

    def forward(self, x):
        return x + self.mlp(self.attn(x))


class Toy(nn.Module):
    """``layers.{0,1}.attn.{q,k,v,o}_proj``, ``layers.N.mlp.{0,2}``, same under ``blocks``, ``lm_head``."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(2)])
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, 5)

    def forward(self, x):
        for layer in [*self.layers, *self.blocks]:
            x = layer(x)
        return self.lm_head(x)


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def adapted(model: lyco.LycoModel) -> list[str]:
    return [name for name, _ in model.adapted_layers()]


def names_ending(model: nn.Module, *suffixes: str) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith(suffixes) and isinstance(m, nn.Linear)]


ALL_LINEAR = [f"{s}.{i}.{p}" for s in ("layers", "blocks") for i in (0, 1)
              for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.0", "mlp.2")]  # fmt: skip


# -- target_modules / exclude_modules / layers ---------------------------------------------------
@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"target_modules": ["q_proj"]}, [f"{s}.{i}.attn.q_proj" for s in ("layers", "blocks") for i in (0, 1)]),
        ({"target_modules": ["layers.1.attn.v_proj"]}, ["layers.1.attn.v_proj"]),  # exact name
        ({"target_modules": ["attn.k_proj", "lm_head"]},
         [f"{s}.{i}.attn.k_proj" for s in ("layers", "blocks") for i in (0, 1)] + ["lm_head"]),
        ({"target_modules": ["mlp.0"]}, ["layers.0.mlp.0", "layers.1.mlp.0", "blocks.0.mlp.0", "blocks.1.mlp.0"]),
        ({"target_modules": r"layers\.\d\.attn\.(q|v)_proj"},
         ["layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"]),
        ({"target_modules": "all-linear"}, ALL_LINEAR),  # lm_head (the output head) excluded
        ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["layers.0.attn.q_proj", "attn.v_proj"]},
         ["layers.1.attn.q_proj", "blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]),
        ({"target_modules": ["q_proj"], "exclude_modules": r"blocks\..*"},
         ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]),
        ({"target_modules": ["q_proj"], "layers_to_transform": 1}, ["layers.1.attn.q_proj", "blocks.1.attn.q_proj"]),
        ({"target_modules": ["q_proj", "mlp.2"], "layers_to_transform": [0], "layers_pattern": "blocks"},
         ["blocks.0.attn.q_proj", "blocks.0.mlp.2"]),
        ({"target_modules": ["q_proj"], "layers_to_transform": [0, 1], "layers_pattern": ["layers"]},
         ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]),
        ({"target_modules": "all-linear", "layers_to_transform": [1], "layers_pattern": "blocks"},
         [n for n in ALL_LINEAR if n.startswith("blocks.1.")]),
    ],
)  # fmt: skip
def test_targeting_rules(cfg_cls, kwargs, expected):
    model = lyco.get_model(toy(), cfg_cls(r=2, **kwargs))
    assert adapted(model) == [n for n in [*ALL_LINEAR, "lm_head"] if n in expected]
    assert sorted(adapted(model)) == sorted(expected)


def test_regex_target_must_match_full_name():
    with pytest.raises(lyco.TargetError):
        lyco.get_model(toy(), lyco.LoHaConfig(target_modules="q_proj"))  # no full name equals "q_proj"
    model = lyco.get_model(toy(), lyco.LoHaConfig(target_modules=r".*q_proj"))
    assert len(adapted(model)) == 4


def test_suffix_match_is_dotted_not_substring():
    # "proj" is not a dotted suffix of "q_proj": it names no module -> TargetError listing close names
    with pytest.raises(lyco.TargetError, match=r"q_proj|k_proj|v_proj|o_proj"):
        lyco.get_model(toy(), lyco.LoHaConfig(target_modules=["proj"]))


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_all_linear_on_second_adapter(cfg_cls):
    model = lyco.get_model(toy(), cfg_cls(r=2, target_modules="all-linear"))
    model.add_adapter("other", cfg_cls(r=2, target_modules="all-linear"))
    assert sorted(adapted(model)) == sorted(ALL_LINEAR)
    for _, layer in model.adapted_layers():
        assert set(layer.lyco_adapters) == {"default", "other"}


# -- rank_pattern / alpha_pattern ----------------------------------------------------------------
def test_pattern_value_rules():
    name = "layers.0.attn.q_proj"
    assert pattern_value({"q_proj": 3}, name, 8) == 3  # dotted suffix
    assert pattern_value({name: 4}, name, 8) == 4  # exact
    assert pattern_value({r"layers\.\d\.attn\.q_proj": 5}, name, 8) == 5  # regex
    assert pattern_value({r"attn\.[qk]_proj": 6}, name, 8) == 6  # regex on a dotted suffix
    assert pattern_value({"proj": 7, "_proj": 7, "layers": 7}, name, 8) == 8  # no partial-word match
    # first matching key in dict order wins, even when a later key is more specific
    assert pattern_value({"q_proj": 3, name: 4}, name, 8) == 3
    assert pattern_value({name: 4, "q_proj": 3}, name, 8) == 4
    assert pattern_value({"v_proj": 9, r".*\.q_proj": 2, "q_proj": 3}, name, 8) == 2


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_rank_alpha_pattern_on_layers(cfg_cls):
    cfg = cfg_cls(
        r=2,
        alpha=4,
        target_modules=["q_proj", "v_proj", "mlp.2"],
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        rank_pattern={"layers.0.attn.q_proj": 1, "q_proj": 3, r"layers\.\d\.mlp\.2": 4},
        alpha_pattern={"v_proj": 6.0, "layers.1.attn.v_proj": 1.0, r"mlp\.\d": 2.0},
    )
    model = lyco.get_model(toy(), cfg)
    layers = dict(model.adapted_layers())
    expected = {  # name: (r, alpha)
        "layers.0.attn.q_proj": (1, 4.0),
        "layers.1.attn.q_proj": (3, 4.0),
        "layers.0.attn.v_proj": (2, 6.0),
        "layers.1.attn.v_proj": (2, 6.0),  # "v_proj" comes first in alpha_pattern
        "layers.0.mlp.2": (4, 2.0),
        "layers.1.mlp.2": (4, 2.0),
    }
    assert sorted(layers) == sorted(expected)
    for name, (r, alpha) in expected.items():
        layer = layers[name]
        assert layer.r == {"default": r}, name
        assert layer.alpha == {"default": alpha}, name
        assert layer.scaling["default"] == pytest.approx(alpha / r), name
    # LoHa stores the rank in its factor shapes: check it reached the parameters
    if cfg_cls is lyco.LoHaConfig:
        assert layers["layers.0.attn.q_proj"].lyco_adapters["default"].hada_w1_a.shape == (8, 1)
        assert layers["layers.0.mlp.2"].lyco_adapters["default"].hada_w2_b.shape == (4, 16)


# -- default target modules -------------------------------------------------------------------
try:
    import transformers
except ImportError:  # pragma: no cover - transformers is a test dependency
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


def _llama_like(config_cls, model_cls):
    cfg = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100)  # fmt: skip
    return model_cls(cfg), {"input_ids": torch.randint(0, 100, (2, 6))}, ["q_proj", "v_proj"]


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg), {"input_ids": torch.randint(0, 100, (2, 6))}, ["c_attn"]


def _bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)  # fmt: skip
    return transformers.BertModel(cfg), {"input_ids": torch.randint(0, 100, (2, 6))}, ["query", "value"]


def _t5():
    cfg = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=100)
    ids = torch.randint(0, 100, (2, 6))
    return (
        transformers.T5ForConditionalGeneration(cfg),
        {"input_ids": ids, "decoder_input_ids": ids},
        ["q", "v"],
    )


def _vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=8)  # fmt: skip
    model = transformers.ViTModel(cfg)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    expected = ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]  # transformers >= 5 renamed
    return model, {"pixel_values": torch.randn(2, 3, 16, 16)}, expected


def _clip():
    cfg = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    inputs = {"input_ids": torch.randint(2, 100, (2, 6)), "pixel_values": torch.randn(2, 3, 16, 16)}
    return transformers.CLIPModel(cfg), inputs, ["q_proj", "v_proj"]


HF_MODELS = {
    "llama": lambda: _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": lambda: _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": lambda: _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gpt2": _gpt2,
    "bert": _bert,
    "t5": _t5,
    "vit": _vit,
    "clip": _clip,
}  # fmt: skip


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "logits_per_image"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(f"no tensor output in {type(out)}")


@needs_transformers
@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize("build", list(HF_MODELS.values()), ids=list(HF_MODELS))
def test_default_targets_transformers(build, cfg_cls):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, inputs, suffixes = build()
    base.eval()
    with torch.no_grad():
        ref = _first_tensor(base(**inputs)).clone()
    expected = [n for n, _ in base.named_modules() if n.endswith(tuple("." + s for s in suffixes))]
    assert expected
    model = lyco.get_model(base, cfg_cls(r=2, init_weights=False))
    assert model.peft_config["default"].target_modules == suffixes
    assert adapted(model) == expected
    with torch.no_grad():
        out = _first_tensor(model(**inputs))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=ATOL)  # the adapters are on the forward path
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(_first_tensor(model(**inputs)), ref, atol=ATOL, rtol=0)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, lyco.AdaptedLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(_first_tensor(plain(**inputs)), out, atol=ATOL, rtol=0)


@needs_transformers
def test_layers_to_transform_on_llama():
    torch.manual_seed(0)
    base, inputs, _ = _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    cfg = lyco.LoKrConfig(
        r=2,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        exclude_modules=["o_proj"],
        layers_to_transform=1,
        layers_pattern="layers",
        rank_pattern={"mlp.down_proj": 1},
    )
    model = lyco.get_model(base, cfg)
    layers = dict(model.adapted_layers())
    assert sorted(layers) == sorted(
        f"model.layers.1.{p}"
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )
    assert layers["model.layers.1.mlp.down_proj"].r == {"default": 1}
    assert layers["model.layers.1.mlp.up_proj"].r == {"default": 2}
    model(**inputs).logits.sum().backward()


@needs_transformers
def test_gpt2_conv1d_targeted_as_linear():
    torch.manual_seed(0)
    base, inputs, _ = _gpt2()
    model = lyco.get_model(base, lyco.LoHaConfig(r=2, target_modules="all-linear", init_weights=False))
    kinds = {name: layer.spec.kind for name, layer in model.adapted_layers()}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d_t"
    assert "lm_head" not in kinds  # the output head is never part of all-linear
    assert set(kinds) == {f"transformer.h.{i}.{p}" for i in (0, 1)
                          for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # fmt: skip
    model(**inputs).logits.sum().backward()


def test_default_targets_diffusers_by_class_name():
    class UNet2DConditionModel(nn.Module):  # stand-in: diffusers is not a dependency
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.ModuleDict({"to_q": nn.Linear(4, 4), "to_k": nn.Linear(4, 4), "to_v": nn.Linear(4, 4),
                                       "to_out": nn.ModuleList([nn.Linear(4, 4), nn.Dropout()])})  # fmt: skip
            self.conv = nn.Conv2d(4, 4, 1)

    base = UNet2DConditionModel()
    assert default_target_modules(base) == DIFFUSERS_ATTENTION_TARGETS == ["to_q", "to_k", "to_v", "to_out.0"]
    model = lyco.get_model(base, lyco.LoKrConfig(r=2))
    assert adapted(model) == ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]


def test_unknown_model_needs_target_modules():
    base = toy()
    with pytest.raises(lyco.TargetError, match="target_modules"):
        default_target_modules(base)
    with pytest.raises(lyco.TargetError, match="Toy"):
        lyco.get_model(base, lyco.LoHaConfig())
    assert not any(isinstance(m, lyco.AdaptedLayer) for m in base.modules())
