"""transformers: an adapted tiny Llama (built from a config, no download) keeps ``generate()``,
``config``, activation checkpointing and the base model's ``save_pretrained``, and trains with
``transformers.Trainer`` (the loss falls); ``LycoTrainer`` checkpoints hold only the adapter (tied GPT-2
embeddings included), resuming from one ends exactly where the uninterrupted run does, and
``load_best_model_at_end`` loads the best adapter in place."""

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


# -- LycoTrainer: checkpoints hold the adapter, resume / load_best_model_at_end load it -------------------
def tiny_gpt2():
    """GPT-2 ties ``lm_head.weight`` to ``wte.weight``: Trainer's full-state-dict fallback refuses it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def _lyco_trainer(model, out, **overrides):
    from transformers import TrainingArguments

    from lyco.integrations.transformers import LycoTrainer

    kwargs = dict(
        output_dir=str(out), max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=8,
        learning_rate=5e-2, warmup_steps=2, lr_scheduler_type="linear", optim="adamw_torch", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
    )  # fmt: skip
    kwargs.update(overrides)
    eval_dataset = _Copy(n=8) if kwargs.get("eval_strategy", "no") != "no" else None
    return LycoTrainer(model=model, args=TrainingArguments(**kwargs), train_dataset=_Copy(), eval_dataset=eval_dataset)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_lyco_trainer_checkpoint_is_the_adapter_with_tied_embeddings(method, tmp_path):
    from lyco.model_io import adapter_state_dict

    model = lyco.get_model(tiny_gpt2(), CONFIGS[method]())  # gpt2 default target: c_attn (Conv1D)
    trainer = _lyco_trainer(model, tmp_path / "run", max_steps=3)
    trainer.train()  # plain Trainer raises here: "Some tensors share memory" (lm_head / wte)
    trainer.save_model(str(tmp_path / "final"))
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt",
        "trainer_state.json", "training_args.bin",
    ]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training_args.bin",
    ]  # fmt: skip
    want = adapter_state_dict(model, "default")
    for folder in (ckpt, tmp_path / "final"):
        saved = _saved(folder)
        assert saved.keys() == want.keys() and all(".c_attn." in k for k in saved)  # no base weight
        for k, v in want.items():
            torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)
    full_bytes = sum(t.numel() * t.element_size() for t in tiny_gpt2().state_dict().values())
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.iterdir())  # adapter + its Adam moments + small files
    assert (ckpt / "adapter_model.safetensors").stat().st_size < full_bytes / 8 and ckpt_bytes < full_bytes / 2
    model.eval()
    reloaded = lyco.LycoModel.from_pretrained(tiny_gpt2(), ckpt)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_lyco_trainer_resume_matches_the_uninterrupted_run(method, tmp_path):
    import shutil

    model = lyco.get_model(tiny_gpt2(), CONFIGS[method]())
    _lyco_trainer(model, tmp_path / "full").train()  # 6 steps, checkpoints at 3 and 6
    want = _trainable(model)
    # A fresh process would rebuild the model: different adapter init, so only the checkpoint can make it match.
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    torch.manual_seed(123)
    resumed = lyco.get_model(tiny_gpt2(), CONFIGS[method]())
    assert any(not torch.equal(p, want[n]) for n, p in _trainable(resumed).items())
    trainer = _lyco_trainer(resumed, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=True)  # the last checkpoint of output_dir: checkpoint-3 (mid-epoch)
    assert trainer.state.global_step == 6
    got = _trainable(resumed)
    assert got.keys() == want.keys()
    diff = max((got[n] - want[n]).abs().max().item() for n in want)
    assert diff <= 1e-6, diff


def test_lyco_trainer_load_best_model_at_end(tmp_path):
    model = lyco.get_model(tiny_gpt2(), CONFIGS["lokr"]())
    params = dict(model.named_parameters())
    # "best" = highest eval loss, i.e. an early checkpoint, not the final weights
    trainer = _lyco_trainer(
        model, tmp_path / "run", eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True,
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-3")
    final = _saved(tmp_path / "run" / "checkpoint-6")
    from lyco.model_io import adapter_state_dict

    now = adapter_state_dict(model, "default")
    assert all(params[n] is p for n, p in model.named_parameters())  # loaded in place
    saved = _saved(tmp_path / "run" / "checkpoint-3")
    for k, v in saved.items():
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(final[k], v) for k, v in saved.items())


def test_copy_adapter_weights_checks_before_copying(tmp_path):
    from lyco.integrations.transformers import copy_adapter_weights

    lyco.get_model(tiny_gpt2(), CONFIGS["loha"]()).save_pretrained(tmp_path / "loha")
    lyco.get_model(tiny_gpt2(), lyco.LoHaConfig(r=2, init_weights=False)).save_pretrained(tmp_path / "loha_r2")
    model = lyco.get_model(tiny_gpt2(), CONFIGS["loha"]())
    before = _trainable(model)
    with pytest.raises(lyco.FormatError, match="LOHA adapter"):
        copy_adapter_weights(lyco.get_model(tiny_gpt2(), CONFIGS["lokr"]()), tmp_path / "loha")
    with pytest.raises(lyco.ShapeMismatchError, match="hada_w1_a"):
        copy_adapter_weights(model, tmp_path / "loha_r2")
    with pytest.raises(lyco.FormatError, match="no adapter 'default'"):
        copy_adapter_weights(model, tmp_path)
    for n, p in _trainable(model).items():
        assert torch.equal(p, before[n]), n


def test_lyco_trainer_label_smoothing_shifts_causal_lm_labels(tmp_path):
    """Trainer shifts labels for label smoothing only when the *wrapper*'s class is a causal LM; for a
    LycoModel around one, LycoTrainer makes it shift as for the bare model."""
    from transformers.trainer_pt_utils import LabelSmoother

    model = lyco.get_model(tiny_gpt2(), CONFIGS["loha"]()).eval()
    trainer = _lyco_trainer(model, tmp_path / "run", label_smoothing_factor=0.1)
    labels = IDS.clone()
    with torch.no_grad():
        got = trainer.compute_loss(model, {"input_ids": IDS, "labels": labels})
        outputs = model(input_ids=IDS)
    smoother = LabelSmoother(epsilon=0.1)
    want = smoother(outputs, labels, shift_labels=True)
    unshifted = smoother(outputs, labels, shift_labels=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert (want - unshifted).abs() > 0.1


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lyco_trainer_ddp_find_unused_parameters_as_for_the_base_model(tmp_path, checkpointing):
    """DDP's find_unused_parameters breaks reentrant activation checkpointing; Trainer turns it off for a
    checkpointing PreTrainedModel, but leaves it on for any other model — a LycoModel included."""
    from transformers import Trainer, TrainingArguments

    def handler(trainer):
        return trainer.accelerator.ddp_handler.find_unused_parameters

    base = tiny_gpt2()
    if checkpointing:
        base.activation_checkpointing_enable()
    model = lyco.get_model(base, CONFIGS["lokr"]())
    plain = Trainer(model=base, args=TrainingArguments(output_dir=str(tmp_path / "p"), use_cpu=True, report_to="none"))
    ours = _lyco_trainer(model, tmp_path / "run")
    assert handler(ours) is handler(plain) is (not checkpointing)
    forced = _lyco_trainer(model, tmp_path / "forced", ddp_find_unused_parameters=True)
    assert handler(forced) is True
