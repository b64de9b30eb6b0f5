"""Original-checkpoint (SGM / compvis) names of a diffusers ``UNet2DConditionModel``'s modules, the names kohya
sd-scripts writes for SDXL (its SDXL UNet is built with them: ``lora_unet_input_blocks_4_1_…``,
``middle_block``, ``output_blocks``, ``label_emb``) and AUTOMATIC1111 maps for SDXL checkpoints.

The mapping is computed from the module names themselves (no config): down block ``i`` with ``n_i`` resnets
takes ``input_blocks`` ``s_i … s_i + n_i - 1`` (``s_0 = 1``; resnet ``.0``, attention ``.1``) and its downsampler
the next one (``.0.op``); the mid block is ``middle_block.0`` (resnet), ``.1`` (attention), ``.2`` (resnet); up
block ``i`` takes ``output_blocks`` ``t_i …`` (resnet ``.0``, attention ``.1``) with its upsampler in its last
one (``.1.conv``, or ``.2.conv`` after an attention); ``conv_in`` → ``input_blocks.0.0``, ``time_embedding.linear_1/2``
→ ``time_embed.0/2``, ``add_embedding.linear_1/2`` → ``label_emb.0.0/0.2``, ``conv_norm_out`` / ``conv_out`` →
``out.0`` / ``out.2``; inside a resnet ``norm1``/``conv1`` → ``in_layers.0/2``, ``time_emb_proj`` →
``emb_layers.1``, ``norm2``/``conv2`` → ``out_layers.0/3``, ``conv_shortcut`` → ``skip_connection``; attention
blocks keep their inner names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["sgm_names", "unet_roots"]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
_MARK = "down_blocks.0.resnets.0.conv1"


def unet_roots(names: Iterable[str]) -> list[str]:
    """The prefixes (``""``, ``"unet."``…) under which ``names`` hold a diffusers UNet (down/mid/up blocks)."""
    return sorted({n[: -len(_MARK)] for n in names if n.endswith(_MARK) and (n == _MARK or n[: -len(_MARK)].endswith("."))})


def _count(names: set[str], pattern: str) -> dict[int, set[int]]:
    found: dict[int, set[int]] = {}
    for n in names:
        m = re.match(pattern, n)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return found


def sgm_names(names: Iterable[str]) -> dict[str, str]:
    """diffusers module path → SGM path, for every module under each UNet root of ``names`` (other modules and
    names outside the known blocks are not in the result)."""
    names = list(names)
    out: dict[str, str] = {}
    for root in unet_roots(names):
        local = {n[len(root) :] for n in names if n.startswith(root)}
        blocks: dict[str, str] = {}  # diffusers block prefix → SGM block prefix
        resnets = _count(local, r"down_blocks\.(\d+)\.resnets\.(\d+)\.")
        attns = _count(local, r"down_blocks\.(\d+)\.attentions\.(\d+)\.")
        index = 1
        for i in sorted(resnets):
            for j in sorted(resnets[i]):
                blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index + j}.0"
                if j in attns.get(i, ()):
                    blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index + j}.1"
            index += len(resnets[i])
            if any(n.startswith(f"down_blocks.{i}.downsamplers.0.") for n in local):
                blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
                index += 1
        mid = sorted({int(m.group(1)) for n in local if (m := re.match(r"mid_block\.resnets\.(\d+)\.", n))})
        for j in mid:
            blocks[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
        blocks["mid_block.attentions.0"] = "middle_block.1"
        up = _count(local, r"up_blocks\.(\d+)\.resnets\.(\d+)\.")
        up_attns = _count(local, r"up_blocks\.(\d+)\.attentions\.(\d+)\.")
        index = 0
        for i in sorted(up):
            for j in sorted(up[i]):
                blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index + j}.0"
                if j in up_attns.get(i, ()):
                    blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index + j}.1"
            last = index + max(up[i])
            blocks[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if up_attns.get(i) else 1}.conv"
            index += len(up[i])
        for n in local:
            sgm = _TOP.get(n)
            if sgm is None:
                for prefix, target in blocks.items():
                    if n == prefix or n.startswith(prefix + "."):
                        rest = n[len(prefix) + 1 :]
                        if ".resnets." in prefix:
                            rest = _RESNET.get(rest, rest)
                        sgm = f"{target}.{rest}" if rest else target
                        break
            if sgm is not None:
                out[root + n] = root + sgm
    return out
