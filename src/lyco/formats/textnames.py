"""Original names of text encoders whose module tree a newer transformers reshaped.

transformers 5 builds ``CLIPTextModel`` without its ``text_model`` level (``encoder.layers.0.self_attn.q_proj``; it
strips ``text_model.`` from checkpoints on load), while every adapter file of the SD family names CLIP-L's modules
with it: kohya sd-scripts (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``), which ComfyUI and
AUTOMATIC1111 map, and nothing else. ``CLIPTextModelWithProjection`` (SDXL's and SD3's CLIP-G) keeps its
``text_model`` child, and T5 is unchanged, so only a bare CLIP text model needs this.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["clip_text_names"]

_MARK = "encoder.layers.0.self_attn.q_proj"
_TOP = ("embeddings", "encoder", "final_layer_norm")


def clip_text_names(names: Iterable[str]) -> dict[str, str]:
    """Module name → its name with ``text_model.`` restored, for each CLIP text model in ``names`` (a root ``r`` with
    ``r + "encoder.layers.0.self_attn.q_proj"`` and ``r + "final_layer_norm"``, neither ``r + "text_model"`` nor itself
    a ``text_model.``: the model itself, or ``text_encoder.`` … of a pipeline-like container); others are left out.

    >>> clip_text_names(["encoder.layers.0.self_attn.q_proj", "final_layer_norm"])["encoder.layers.0.self_attn.q_proj"]
    'text_model.encoder.layers.0.self_attn.q_proj'
    """
    names = list(names)
    have = set(names)
    roots = [n[: -len(_MARK)] for n in names if n.endswith(_MARK) and (n == _MARK or n[: -len(_MARK)].endswith("."))]
    roots = [r for r in roots if f"{r}final_layer_norm" in have and not r.endswith("text_model.")  # CLIP-G's own child
             and not any(n.startswith(f"{r}text_model") for n in have)]  # fmt: skip
    out: dict[str, str] = {}
    for root in roots:
        for n in names:
            rest = n[len(root) :] if n.startswith(root) else None
            if rest is not None and rest.split(".", 1)[0] in _TOP:
                out[n] = f"{root}text_model.{rest}"
    return out
