"""transformers: an adapted tiny Llama (built from a config, no download) keeps ``generate()``,
``config``, activation checkpointing and the base model's ``save_pretrained``, and trains with
``transformers.Trainer`` (the loss falls)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import lyco

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 64


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
CONFIGS = {
    "loha": lambda **kw: lyco.LoHaConfig(r=4, alpha=4, init_weights=False, **kw),
    "lokr": lambda **kw: lyco.LoKrConfig(r=4, alpha=4, init_weights=False, decompose_both=True, **kw),
}


@pytest.fixture(params=list(CONFIGS))
def method(request) -> str:
    return request.param


def test_default_targets_config_and_generate(method):
    base = tiny_llama()
    with torch.no_grad():
        base_logits = base(IDS).logits
        base_gen = base.generate(IDS, max_new_tokens=5, do_sample=False)
    model = lyco.get_model(base, CONFIGS[method]())  # no target_modules: llama defaults (q_proj, v_proj)
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in model.adapted_layers()}) == ["q_proj", "v_proj"]
    assert model.config is base.config and model.get_base_model() is base
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, base_logits, atol=1e-4)
        gen = model.generate(IDS, max_new_tokens=5, do_sample=False)
        with model.disable_adapter():
            torch.testing.assert_close(model.generate(IDS, max_new_tokens=5, do_sample=False), base_gen)
        model.merge_adapter()
        torch.testing.assert_close(model.generate(IDS, max_new_tokens=5, do_sample=False), gen)
    assert gen.shape == (2, 15)


def test_forward_signature_is_the_base_models():
    """transformers' Trainer keeps only batch keys named in ``inspect.signature(model.forward)``."""
    model = lyco.get_model(tiny_llama(), CONFIGS["loha"]())
    params = inspect.signature(model.forward).parameters
    assert list(params)[:2] == ["input_ids", "attention_mask"] and "labels" in params


def _enable_checkpointing(model, use_reentrant: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated in v5
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        else:  # transformers 4.x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(method, use_reentrant):
    grads = []
    for checkpointing in (False, True):
        model = lyco.get_model(tiny_llama(), CONFIGS[method](target_modules=["q_proj", "v_proj", "down_proj"]))
        model.train()
        if checkpointing:
            _enable_checkpointing(model, use_reentrant)
            assert model.is_gradient_checkpointing
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None, f"{name}: no gradient with checkpointing"
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_base_save_pretrained_after_merge_and_unload(method, tmp_path):
    model = lyco.get_model(tiny_llama(), CONFIGS[method]())
    with torch.no_grad():
        want = model(IDS).logits
    keys = set(tiny_llama().state_dict())
    merged = model.merge_and_unload()
    assert set(merged.state_dict()) == keys  # plain transformers keys: loadable by from_pretrained
    merged.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, want, rtol=1e-4, atol=1e-5)


def test_unload_gives_back_the_base_checkpoint(tmp_path):
    base = tiny_llama()
    want = {k: v.clone() for k, v in base.state_dict().items()}
    model = lyco.get_model(base, CONFIGS["lokr"]())
    model.unload().save_pretrained(tmp_path / "base")
    got = LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


class _Copy(torch.utils.data.Dataset):
    """Sequences ``a b a b ...`` over 4 of the 64 tokens (easy to learn); an extra column Trainer must drop."""

    def __init__(self, n: int = 32, length: int = 12) -> None:
        g = torch.Generator().manual_seed(2)
        pairs = torch.randint(3, 7, (n, 2), generator=g)
        self.rows = [pairs[i].repeat(length // 2) for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i], "note": 0}


@pytest.mark.slow
def test_trainer_trains_and_saves(method, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lyco.get_model(tiny_llama(), CONFIGS[method](target_modules="all-linear"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=60, per_device_train_batch_size=8, learning_rate=5e-2,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant", optim="adamw_torch",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_Copy())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5 < 0.95 * losses[0], losses  # ln(64) → ~3.5
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lyco_adapters" not in n)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    reloaded = lyco.LycoModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-6)
