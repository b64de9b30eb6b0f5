"""LoHa on a diffusers UNet: resnet convs (effective conv / CP) and attention projections, a few
denoising steps, then merge for inference and export a kohya-style ``lora_unet_`` file.

    python examples/diffusers_unet.py --steps 5

The UNet is a tiny UNet2DConditionModel built from a config (offline); with a real pipeline use
``pipe.unet`` the same way and keep the scheduler/VAE/text encoder untouched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

import lyco


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("lyco_unet_out"))
    args = parser.parse_args(argv)

    config = lyco.LoHaConfig(
        r=4, alpha=4, use_effective_conv2d=True,
        target_modules=["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"],
    )  # fmt: skip
    unet = lyco.get_model(tiny_unet(), config)
    unet.print_trainable_parameters()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 5, 16, generator=g)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    unet.train()
    losses = []
    for step in range(args.steps):  # the standard noise-prediction objective
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        print(f"step {step}: loss {loss.item():.4f}")

    unet.eval()
    t = torch.tensor([500] * 4)
    with torch.no_grad():
        adapted = unet(latents, t, encoder_hidden_states=text).sample
    unet.save_pretrained(args.out / "peft")  # PEFT layout
    if hasattr(lyco, "save_lycoris"):  # kohya / LyCORIS single file for UIs that load lora_unet_ keys
        lyco.save_lycoris(unet, args.out / "unet_loha.safetensors", prefix="lora_unet_")
    merged = unet.merge_and_unload()  # plain UNet2DConditionModel with ΔW folded in: no adapter cost
    with torch.no_grad():
        diff = (merged(latents, t, encoder_hidden_states=text).sample - adapted).abs().max().item()
    print(f"merged vs adapted: max diff {diff:.2e}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "merged_diff": diff}


if __name__ == "__main__":
    main()
