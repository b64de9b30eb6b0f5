"""🤗 accelerate + FSDP2 + lyco: fine-tune a transformers model with sharded parameters.

GPUs (the usual way):

    accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 examples/accelerate_fsdp.py
    # or: torchrun --nproc-per-node 2 examples/accelerate_fsdp.py  (the plugin below turns FSDP2 on)

CPU, 2 processes (what the test suite runs):

    torchrun --nproc-per-node 2 examples/accelerate_fsdp.py --steps 5

Recipe:
1. ``lyco.get_model`` on the unsharded model, *before* ``accelerator.prepare``.
2. ``FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap", ...)``:
   accelerate shards each decoder layer and the root; frozen base weights and trainable adapters may
   share a layer's FSDP group. Build the optimizer on the trainable parameters, then ``prepare`` both.
3. Save with ``accelerator.unwrap_model(model).save_pretrained(dir)`` on every rank (lyco gathers the
   adapter shards; rank 0 writes). Merge afterwards on one process: ``LycoModel.from_pretrained(base,
   dir).merge_and_unload()``; merging the sharded model raises ``lyco.MergeError``.

accelerate only enables FSDP for accelerator devices; on CPU this script switches the state to FSDP by
hand so the same code path runs on a laptop or in CI with gloo.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import LlamaConfig, LlamaForCausalLM

import lyco


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> dict[str, float] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("lyco_accelerate_out"))
    args = parser.parse_args(argv)

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
    )  # fmt: skip
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=not torch.cuda.is_available())
    if accelerator.distributed_type == DistributedType.MULTI_CPU:  # accelerate has no CPU FSDP mode: force it
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    assert accelerator.num_processes == 1 or accelerator.is_fsdp2
    result = train(args, accelerator)
    accelerator.free_memory()  # drop accelerate's references to the prepared model and optimizer
    gc.collect()  # the sharded model dies before the process group does (teardown order matters for gloo)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def train(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, float] | None:
    model = lyco.get_model(tiny_llama(), lyco.LoKrConfig(r=4, alpha=4, target_modules="all-linear", init_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model, opt = accelerator.prepare(model, opt)

    rank = accelerator.process_index
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    pairs = torch.randint(3, 7, (8, 2), generator=g)
    ids = pairs.repeat(1, 6).to(accelerator.device)
    losses = []
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        accelerator.print(f"step {step}: loss {loss.item():.4f}")

    model.eval()
    probe = torch.tensor([[3, 4, 3, 4, 3, 4]], device=accelerator.device)
    with torch.no_grad():
        sharded_logits = model(input_ids=probe).logits.cpu()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.out)  # every rank: gathered, rank 0 writes
    result = None
    if accelerator.is_main_process:
        merged = lyco.LycoModel.from_pretrained(tiny_llama(), args.out).merge_and_unload().eval()
        with torch.no_grad():
            diff = (merged(input_ids=probe.cpu()).logits - sharded_logits).abs().max().item()
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; merged (unsharded) vs FSDP2 model: max diff {diff:.2e}")
        result = {"first_loss": losses[0], "last_loss": losses[-1], "merged_diff": diff}
    return result


if __name__ == "__main__":
    main()
