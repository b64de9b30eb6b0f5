"""Fine-tune a transformers causal LM with LoKr through ``LycoTrainer``, then ship the adapter.

    python examples/transformers_trainer.py --steps 60 --out lyco_trainer_out

The model is a tiny Llama built from a config so the script runs offline in seconds; swap in
``AutoModelForCausalLM.from_pretrained(...)`` for a real one: nothing else changes.

- ``lyco.get_model`` adapts the model in place; ``generate()``, ``config`` and activation checkpointing
  are the base model's own, and ``inspect.signature(model.forward)`` is the base model's, so Trainer's
  ``remove_unused_columns`` keeps the right batch keys.
- ``lyco.integrations.transformers.LycoTrainer`` checkpoints the adapter as PEFT's Trainer path does:
  ``checkpoint-N/`` and ``trainer.save_model()`` hold ``adapter_config.json`` + ``adapter_model.safetensors``
  (``save_pretrained``'s PEFT layout, also loadable by ``peft``), not the base model, and
  ``train(resume_from_checkpoint=True)`` loads the adapter back. A plain ``Trainer`` would write the full
  state dict (and fail on tied embeddings). ``merge_and_unload()`` gives back a plain transformers model
  whose ``save_pretrained`` is a normal checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import lyco
from lyco.integrations.transformers import LycoTrainer


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class Alternating(torch.utils.data.Dataset):
    """Sequences ``a b a b ...`` over 4 tokens: easy to learn, so the loss visibly falls."""

    def __init__(self, n: int = 32, length: int = 12) -> None:
        pairs = torch.randint(3, 7, (n, 2), generator=torch.Generator().manual_seed(2))
        self.rows = [pairs[i].repeat(length // 2) for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("lyco_trainer_out"))
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    args = parser.parse_args(argv)

    model = lyco.get_model(tiny_llama(), lyco.LoKrConfig(r=4, alpha=4, target_modules="all-linear", init_weights=False))
    model.print_trainable_parameters()
    training = TrainingArguments(
        output_dir=str(args.out / "run"), max_steps=args.steps, per_device_train_batch_size=8, learning_rate=5e-2,
        lr_scheduler_type="constant", logging_steps=max(args.steps // 10, 1), report_to="none",
        save_strategy="steps", save_steps=max(args.steps // 2, 1), save_total_limit=1,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0, optim="adamw_torch",
        gradient_checkpointing=args.checkpointing,
    )  # fmt: skip
    trainer = LycoTrainer(model=model, args=training, train_dataset=Alternating())
    trainer.train()  # resume an interrupted run with trainer.train(resume_from_checkpoint=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    last = max((args.out / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    print(f"{last.name}:", sorted(p.name for p in last.iterdir()))  # adapter files, optimizer, scheduler, RNG

    trainer.save_model(str(args.out / "adapter"))  # adapter_config.json + adapter_model.safetensors
    model.eval()
    prompt = torch.tensor([[3, 4, 3, 4]])
    with torch.no_grad():
        print("generate:", model.generate(prompt, max_new_tokens=6, do_sample=False)[0].tolist())

    reloaded = lyco.LycoModel.from_pretrained(tiny_llama(), args.out / "adapter")
    merged = reloaded.merge_and_unload()  # a plain LlamaForCausalLM again
    merged.save_pretrained(args.out / "merged")
    again = LlamaForCausalLM.from_pretrained(args.out / "merged").eval()
    with torch.no_grad():
        diff = (again(prompt).logits - model(prompt).logits).abs().max().item()
    print(f"merged checkpoint vs adapted model: max |Δlogits| = {diff:.2e}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "merged_diff": diff}


if __name__ == "__main__":
    main()
