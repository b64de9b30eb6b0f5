"""diffusers: adapters on a tiny UNet2DConditionModel and a tiny SD3 transformer built from configs (no
download): Conv2d targets (3×3 with and without effective conv / CP, 2×2 patch embedding) and attention
Linear targets, training steps, merge for inference, PEFT-dir and kohya ``lora_unet_`` round trips."""

from __future__ import annotations

import pytest
import torch

import lyco

diffusers = pytest.importorskip("diffusers")

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    ).eval()  # fmt: skip


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
    ).eval()  # fmt: skip


_g = torch.Generator().manual_seed(1)
UNET_IN = {"sample": torch.randn(2, 4, 8, 8, generator=_g), "timestep": torch.tensor([10, 500]),
           "encoder_hidden_states": torch.randn(2, 5, 16, generator=_g)}  # fmt: skip
SD3_IN = {"hidden_states": torch.randn(2, 4, 8, 8, generator=_g), "timestep": torch.tensor([10, 500]),
          "encoder_hidden_states": torch.randn(2, 5, 16, generator=_g), "pooled_projections": torch.randn(2, 8, generator=_g)}  # fmt: skip

MODELS = {
    # UNet: resnet 3×3 convs + attention linears
    "unet": (tiny_unet, UNET_IN, ["conv1", "conv2", *ATTN]),
    # SD3: 2×2 patch-embedding conv + joint attention (image and text streams)
    "sd3": (tiny_sd3, SD3_IN, ["pos_embed.proj", *ATTN, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]),
}
CONFIGS = {
    "loha": lambda t: lyco.LoHaConfig(r=4, alpha=4, target_modules=t, init_weights=False),
    "loha_cp": lambda t: lyco.LoHaConfig(r=4, alpha=4, target_modules=t, init_weights=False, use_effective_conv2d=True),
    "lokr": lambda t: lyco.LoKrConfig(r=2, alpha=2, target_modules=t, init_weights=False, decompose_both=True),
    "lokr_cp": lambda t: lyco.LoKrConfig(r=2, alpha=2, target_modules=t, init_weights=False, decompose_both=True,
                                         use_effective_conv2d=True),
}  # fmt: skip


def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


@pytest.mark.parametrize("arch", list(MODELS))
def test_default_targets_are_the_attention_projections(arch):
    build, inputs, _ = MODELS[arch]
    model = lyco.get_model(build(), lyco.LoKrConfig(r=2))
    names = [n for n, _ in model.adapted_layers()]
    assert names and {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n in names} == set(ATTN)
    with torch.no_grad():
        run(model, inputs)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_conv_and_attention_adapters_train_and_merge(arch, method, tmp_path):
    build, inputs, targets = MODELS[arch]
    base = build()
    with torch.no_grad():
        base_out = run(base, inputs)
    model = lyco.get_model(base, CONFIGS[method](targets))
    kinds = {type(layer.base_layer).__name__ for _, layer in model.adapted_layers()}
    assert kinds == {"Conv2d", "Linear"}
    if method == "loha_cp" or (method == "lokr_cp" and arch == "unet"):  # effective conv: CP cores on k×k convs
        # (LoKr's 2×2 SD3 patch conv keeps a full w2: CP only applies to a low-rank w2)
        cores = [n for n, _ in model.named_parameters() if n.endswith(("hada_t1", "lokr_t2"))]
        assert cores
    # a few steps on a denoising-style loss
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    target = torch.randn_like(base_out, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(run(model, inputs), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        adapted = run(model, inputs)
        assert not torch.allclose(adapted, base_out, atol=1e-4)
        model.save_pretrained(tmp_path / "peft")
        reloaded = lyco.LycoModel.from_pretrained(build(), tmp_path / "peft")
        torch.testing.assert_close(run(reloaded, inputs), adapted, rtol=1e-5, atol=1e-6)
        merged = reloaded.merge_and_unload()  # inference: plain diffusers model, ΔW folded in
        assert type(merged).__name__ == type(base).__name__
        assert set(merged.state_dict()) == set(build().state_dict())
        torch.testing.assert_close(run(merged, inputs), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not hasattr(lyco, "save_lycoris"), reason="lyco.save_lycoris / load_lycoris not available yet")
@pytest.mark.parametrize("method", ["loha_cp", "lokr"])
def test_kohya_lora_unet_round_trip(method, tmp_path):
    """kohya/LyCORIS single file with the ``lora_unet_`` prefix: underscore keys resolve back onto the UNet's
    dotted module names (``down_blocks.0.attentions.0...attn1.to_out.0``) with the same outputs."""
    from safetensors import safe_open

    build, inputs, targets = MODELS["unet"]
    model = lyco.get_model(build(), CONFIGS[method](targets))
    with torch.no_grad():
        want = run(model, inputs)
    path = tmp_path / "unet.safetensors"
    lyco.save_lycoris(model, path, prefix="lora_unet_")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in keys
    loaded = lyco.load_lycoris(build(), path, prefix="lora_unet_")
    assert sorted(n for n, _ in loaded.adapted_layers()) == sorted(n for n, _ in model.adapted_layers())
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", list(MODELS))
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    """diffusers' own ``enable_gradient_checkpointing()`` (reached through the LycoModel): same adapter grads."""
    build, inputs, targets = MODELS[arch]
    grads = []
    for checkpointing in (False, True):
        model = lyco.get_model(build(), CONFIGS["loha_cp"](targets))
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
        run(model, inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
