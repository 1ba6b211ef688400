"""Named edit sites, found by probing the module tree rather than by model name.

Editors and configs name places in a model with a small, model-independent vocabulary:

    llm.layers.<i>[.<sub.path>]    an LLM decoder layer (negative i counts from the end),
                                   e.g. llm.layers.-1.mlp.down_proj
    audio.layers.<i>[.<sub.path>]  an audio-encoder layer, e.g. audio.layers.0.fc2
    connector[.<sub.path>]         the audio-to-LLM modality connector
    final_norm                     the LLM's last norm before the head
    lm_head                        the output projection

`EditSites.resolve` turns such a name into the module path of the loaded model, so the same
config works across model families and across transformers versions that move modules around
(Qwen2-Audio is flat up to transformers 5.9 and nested under `.model` from 5.10).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Attribute names the audio-to-LLM connector has across the supported families.
CONNECTOR_NAMES = ("multi_modal_projector", "connector", "audio_projector", "projector")


def _is_llm_layer(m: nn.Module) -> bool:
    mlp = getattr(m, "mlp", None)
    return hasattr(m, "self_attn") and mlp is not None and all(hasattr(mlp, p) for p in MLP_PROJECTIONS)


def _is_audio_layer(m: nn.Module) -> bool:
    # Whisper-style encoder block; decoder blocks (with cross-attention) are not audio layers.
    return (
        hasattr(m, "self_attn") and hasattr(m, "fc1") and hasattr(m, "fc2") and not hasattr(m, "encoder_attn")
    )


def _find_layer_list(model: nn.Module, is_layer) -> str | None:
    """Path of the longest ModuleList whose members all pass `is_layer` (the shallowest on ties)."""
    best: tuple[int, int, str] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(is_layer(m) for m in mod):
            key = (len(mod), -name.count("."), name)
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else best[2]


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


@dataclass(frozen=True)
class EditSites:
    """Module paths of the named sites of one loaded model."""

    llm_layers: str
    audio_layers: str | None
    connector: str | None
    final_norm: str | None
    lm_head: str | None
    num_llm_layers: int
    num_audio_layers: int

    @classmethod
    def probe(cls, model: nn.Module, overrides: Mapping[str, str] | None = None) -> EditSites:
        """Find the sites in `model`; `overrides` maps site names to explicit module paths."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - {"llm_layers", "audio_layers", "connector", "final_norm", "lm_head"}
        if unknown:
            raise ValueError(f"edit_sites overrides: unknown site names {sorted(unknown)}")
        for path in overrides.values():
            model.get_submodule(path)  # raises AttributeError naming the missing part

        llm = overrides.get("llm_layers") or _find_layer_list(model, _is_llm_layer)
        if llm is None:
            raise ValueError(
                f"{type(model).__name__}: found no LLM decoder layers (a ModuleList of blocks with self_attn "
                "and mlp.gate_proj/up_proj/down_proj); set model.edit_sites.llm_layers to their module path"
            )
        audio = overrides.get("audio_layers") or _find_layer_list(model, _is_audio_layer)
        connector = overrides.get("connector")
        if connector is None:
            candidates = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in CONNECTOR_NAMES]
            connector = min(candidates, key=lambda n: n.count("."), default=None)
        final_norm = overrides.get("final_norm")
        if final_norm is None:
            parent = llm.rsplit(".", 1)[0] if "." in llm else ""
            norm = getattr(model.get_submodule(parent), "norm", None)
            final_norm = _name_of(model, norm)
        lm_head = overrides.get("lm_head")
        if lm_head is None and hasattr(model, "get_output_embeddings"):
            lm_head = _name_of(model, model.get_output_embeddings())
        return cls(
            llm_layers=llm,
            audio_layers=audio,
            connector=connector,
            final_norm=final_norm,
            lm_head=lm_head,
            num_llm_layers=len(model.get_submodule(llm)),
            num_audio_layers=len(model.get_submodule(audio)) if audio else 0,
        )

    def resolve(self, name: str) -> str:
        """Module path for a site name such as `llm.layers.-1.mlp.down_proj`."""
        head, _, rest = name.partition(".")
        if head in ("llm", "audio"):
            kind, _, rest = rest.partition(".")
            base, count = (
                (self.llm_layers, self.num_llm_layers)
                if head == "llm"
                else (self.audio_layers, self.num_audio_layers)
            )
            index, _, rest = rest.partition(".")
            if kind != "layers" or base is None:
                raise KeyError(f"edit site {name!r}: this model has no {head}.layers")
            try:
                i = int(index)
            except ValueError:
                raise KeyError(f"edit site {name!r}: layer index {index!r} is not an integer") from None
            if not -count <= i < count:
                raise KeyError(f"edit site {name!r}: layer {i} out of range for {count} {head} layers")
            path = f"{base}.{i % count}"
        elif head in ("connector", "final_norm", "lm_head"):
            path = getattr(self, head)
            if path is None:
                raise KeyError(f"edit site {name!r}: this model has no {head}")
        else:
            raise KeyError(
                f"edit site {name!r}: must start with llm.layers.<i>, audio.layers.<i>, connector, "
                "final_norm or lm_head"
            )
        return f"{path}.{rest}" if rest else path

    def llm_mlp(self, layer: int, projection: str) -> str:
        """Module path of an MLP projection (gate_proj, up_proj, down_proj) of an LLM layer."""
        if projection not in MLP_PROJECTIONS:
            raise KeyError(f"MLP projection must be one of {MLP_PROJECTIONS}, got {projection!r}")
        return self.resolve(f"llm.layers.{layer}.mlp.{projection}")


def audio_stem(model: nn.Module, sites: EditSites) -> tuple[str, int]:
    """The module path of the audio encoder's last convolution before its layers (Whisper's
    conv2) and the product of the convolutions' strides: each of its output frames spans that
    many feature frames. Found in the module that holds the audio layers."""
    if sites.audio_layers is None:
        raise ValueError(f"{type(model).__name__}: no audio-encoder layers found, so no convolutional stem")
    encoder = sites.audio_layers.rsplit(".", 1)[0] if "." in sites.audio_layers else ""
    convs = [(n, m) for n, m in model.get_submodule(encoder).named_children() if isinstance(m, nn.Conv1d)]
    if not convs:
        raise ValueError(f"{type(model).__name__}: the audio encoder {encoder!r} has no Conv1d stem")
    stride = 1
    for _, conv in convs:
        stride *= int(conv.stride[0])
    return f"{encoder}.{convs[-1][0]}" if encoder else convs[-1][0], stride
