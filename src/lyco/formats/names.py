"""The one resolver of module names in adapter files, over a table built from a model or from a weights file.

A name from a file — a key stem with a prefix (``lora_te1_text_model_encoder_layers_0_mlp_fc1``,
``transformer.blocks.0.attn.to_q``) or a plain module path (a PEFT folder's ``layers.0.q_proj``) — is
looked up, first hit wins:

1. the name itself, when the table has a module of that name;
2. with a known prefix (:mod:`lyco.formats.keys`): the path after it, dotted or with dots read as
   underscores (kohya), at the table's root and under the roots its component uses in a pipeline-like
   container (``unet``, ``text_encoder_2``, ``model.diffusion_model``, …);
   without one: the name with dots read as underscores;
3. a unique suffix at a path boundary (the table has an extra root, e.g. a ``LlamaForCausalLM`` state dict
   for a file trained on ``LlamaModel``).

Several candidates at one step are an error naming them; a name with none is reported with the closest
module names. ``load_lycoris``, ``lyco merge``, ``lyco convert --base`` and ``lyco inspect --base`` all
resolve through :meth:`ModuleTable.resolve`, so they give the same answer.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..errors import ArgumentError, FormatError
from ..ops.layerops import layer_spec
from .keys import COMPONENT_ROOTS, Convention, match_convention, underscore
from .sgm import sgm_names
from .textnames import clip_text_names

Shape = tuple[int, ...]
WEIGHT = ".weight"
BIAS = ".bias"
_PLAIN = Convention("", "module path", "", True)  # a name without a known prefix


@dataclass
class Resolution:
    """``found``: file name → module name (file order); ``missing``: file name → why nothing matched;
    ``outside``: names skipped because they lack the requested ``prefix``."""

    found: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)


class ModuleTable:
    """The module names adapter files are resolved against.

    ``shapes``: adaptable module → weight shape (canonical ``(out, in, *k)`` for a model's layers; as stored
    for a weights file, where a transformers ``Conv1D`` weight is ``(in, out)``); ``others``: the other
    modules → type name (for hints). ``source`` names the table in messages.
    """

    def __init__(self, shapes: Mapping[str, Shape], others: Mapping[str, str] | None = None, source: str = "model"):
        self.shapes = dict(shapes)
        self.others = dict(others or {})
        self.source = source
        self._containers = {n.rsplit(".", k)[0] for n in [*self.shapes, *self.others] for k in range(1, n.count(".") + 1)}
        self._underscore: dict[str, dict[str, list[str]]] = {}
        # a diffusers UNet's modules answer to their original-checkpoint (SGM) names too (kohya's SDXL files), and a
        # transformers-5 CLIP text model's to its names with text_model. (every SD-family file's text encoder keys)
        every = [*self.shapes, *self.others]
        renames = {**sgm_names(every), **clip_text_names(every)}
        self.aliases = {alias: name for name, alias in renames.items() if name in self.shapes}

    @classmethod
    def from_module(cls, root: nn.Module, source: str = "model") -> ModuleTable:
        """The table of a module tree. Wrappers following PEFT's protocol — lyco's ``AdaptedLayer`` and
        ``ModulesToSaveWrapper``, PEFT's layers: a ``get_base_layer()`` method — stand for the layer they wrap
        and hide their internals; a root with ``get_base_model()`` (``LycoModel``, ``PeftModel``) is read
        through to the model it wraps."""
        if not isinstance(root, nn.Module):
            raise ArgumentError(f"module names are read from a torch.nn.Module, got {type(root).__name__}")
        while callable(getattr(root, "get_base_model", None)):
            root = root.get_base_model()
        shapes: dict[str, Shape] = {}
        others: dict[str, str] = {}
        seen: set[int] = {id(root)}

        def walk(prefix: str, module: nn.Module) -> None:
            for child_name, child in module.named_children():
                if id(child) in seen:
                    continue
                seen.add(id(child))
                name = f"{prefix}.{child_name}" if prefix else child_name
                wrapped = child.get_base_layer() if callable(getattr(child, "get_base_layer", None)) else None
                spec = layer_spec(wrapped if wrapped is not None else child)
                if spec is not None:
                    shapes[name] = spec.weight_shape
                else:
                    others[name] = type(child).__name__
                if wrapped is None:
                    walk(name, child)

        walk("", root)
        return cls(shapes, others, source)

    @classmethod
    def from_weights(cls, weights: Iterable[str] | Mapping[str, Shape], source: str) -> ModuleTable:
        """The table of a state dict: ``weights`` maps tensor names (``<module>.weight`` count) to shapes."""
        shapes = dict(weights) if isinstance(weights, Mapping) else dict.fromkeys(weights, ())
        return cls({k[: -len(WEIGHT)]: s for k, s in shapes.items() if k.endswith(WEIGHT)}, source=source)

    def kernel(self, name: str) -> Shape:
        """The kernel dims of an adaptable module (``()`` for linear layers)."""
        return tuple(self.shapes[name][2:])

    # -- lookup ------------------------------------------------------------------------------------
    def _under(self, root: str) -> dict[str, list[str]]:
        if root not in self._underscore:
            table: dict[str, list[str]] = {}
            for alias, name in [*((n, n) for n in self.shapes), *self.aliases.items()]:
                if root and not alias.startswith(root + "."):
                    continue
                table.setdefault(underscore(alias[len(root) + 1 :] if root else alias), []).append(name)
            self._underscore[root] = table
        return self._underscore[root]

    def _roots(self, component: str) -> list[str]:
        return ["", *(r for r in COMPONENT_ROOTS.get(component, ()) if r in self._containers or r in self.shapes)]

    def _in_roots(self, conv: Convention, path: str) -> list[str]:
        found: list[str] = []
        for root in self._roots(conv.component):
            full = f"{root}.{path}" if root else path
            if conv.dotted or "." in path:
                if full in self.shapes:
                    found.append(full)
                elif full in self.aliases:
                    found.append(self.aliases[full])
            else:
                found.extend(self._under(root).get(path, []))
        return list(dict.fromkeys(found))

    def _by_suffix(self, path: str) -> list[str]:
        if "." in path:
            return [m for m in self.shapes if m.endswith("." + path)]
        tail = "_" + underscore(path)
        return [m for m in self.shapes if underscore(m).endswith(tail)]

    def candidates(self, name: str, prefix: str | None = None) -> tuple[Convention, list[str]] | None:
        """``(convention, candidate modules)`` of one file name by the rules of the module docstring (an empty
        list: no match); ``None`` when ``prefix`` is given and the name does not carry it."""
        conv = match_convention(name, prefix)
        if conv is None and prefix is not None:
            return None
        if name in self.shapes:
            return conv or _PLAIN, [name]
        path = name[len(conv.prefix) :] if conv is not None else name
        found = self._in_roots(conv, path) if conv is not None else self._under("").get(underscore(name), [])
        return conv or _PLAIN, found or self._by_suffix(path)

    def describe_missing(self, conv: Convention, path: str) -> str:
        """Why ``path`` names no adaptable module: a module of another type, or the closest names."""
        for root in self._roots(conv.component):
            full = f"{root}.{path}" if root else path
            hit = [n for n in self.others if n == full or (not conv.dotted and underscore(n) == underscore(full))]
            if hit:
                return f"module {hit[0]!r} is a {self.others[hit[0]]}, which lyco cannot adapt"
        forms = {underscore(n) if not conv.dotted else n: n for n in self.shapes}
        close = difflib.get_close_matches(path, list(forms), n=3, cutoff=0.5)
        return f"no module {path!r}; closest modules: " + (", ".join(forms[c] for c in close) if close else "none")

    def resolve(self, names: Iterable[str], prefix: str | None = None, what: str = "") -> Resolution:
        """Resolve every name. Ambiguous names and two names for one module are :class:`FormatError`\\ s (``what``:
        the file, for messages); misses are listed in :attr:`Resolution.missing` for the caller to report."""
        res = Resolution()
        owner: dict[str, str] = {}
        where = f"{what}: " if what else ""
        for name in names:
            hit = self.candidates(name, prefix)
            if hit is None:
                res.outside.append(name)
                continue
            conv, found = hit
            if len(found) > 1:
                raise FormatError(
                    f"{where}{name!r} ({conv.name} convention) is ambiguous: it can name modules {found}; several "
                    f"modules of the {self.source} match: rename one of them or use unambiguous names"
                )
            if not found:
                res.missing[name] = self.describe_missing(conv, name[len(conv.prefix) :])
                continue
            if found[0] in owner:
                raise FormatError(f"{where}keys {owner[found[0]]!r} and {name!r} both name module {found[0]!r}; pass prefix=...")
            owner[found[0]] = name
            res.found[name] = found[0]
        return res

    def require(self, names: Iterable[str], what: str = "adapter") -> dict[str, str]:
        """:meth:`resolve` where every name must match: a :class:`FormatError` lists the misses."""
        res = self.resolve(names, what=what)
        if res.missing:
            listed = "; ".join(f"{n} ({why})" for n, why in list(res.missing.items())[:8])
            raise FormatError(f"{len(res.missing)} {what} module(s) not found in {self.source}: {listed}")
        return res.found
