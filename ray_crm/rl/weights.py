"""PURE: the policy weights that travel from the learner to the rollout engines.

Two jobs, both torch/numpy only:
- `policy_state_dict`: the learner's current policy as a plain HF state dict (LoRA merged in, without
  touching the trained model), which is what vLLM's `load_weights` understands; with `lora_targets_only`
  just the tensors a LoRA step changes (a partial sync: 12% of SmolLM2's bytes for q/v adapters);
- `PackedWeights`: that state dict as uint8 numpy views, so one `ray.put` copies it into the object store
  and every engine on the node maps it without another copy (torch tensors would be pickled; vLLM's
  `collective_rpc` would turn them into lists).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

# HF projections that vLLM serves as one fused layer (qkv_proj, gate_up_proj). Its in-place reload rebuilds a
# fused layer from all its parts, so a partial sync must send the whole group; the engine checks this
# against the served model's own mapping.
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class PackedWeights:
    """A state dict as raw bytes: one uint8 array per tensor plus what it takes to view it back."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    buffers: tuple[np.ndarray, ...]
    partial: bool = False  # only some of the model's tensors: the engine keeps the others

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) views over the buffers, which may be read-only object-store memory: read only."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, dtype, shape, buf in zip(self.names, self.dtypes, self.shapes, self.buffers, strict=True):
                yield name, torch.from_numpy(buf).view(getattr(torch, dtype)).reshape(shape)


def pack_state_dict(
    state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None, partial: bool = False
) -> PackedWeights:
    """Byte views of the tensors (no copy for contiguous CPU tensors already in `dtype`)."""
    names, dtypes, shapes, buffers = [], [], [], []
    for name, tensor in state_dict.items():
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.cpu().contiguous()
        names.append(name)
        dtypes.append(str(t.dtype).removeprefix("torch."))
        shapes.append(tuple(t.shape))
        buffers.append(t.reshape(-1).view(torch.uint8).numpy())
    return PackedWeights(tuple(names), tuple(dtypes), tuple(shapes), tuple(buffers), partial)


@torch.no_grad()
def policy_state_dict(model: nn.Module, lora_targets_only: bool = False) -> dict[str, Tensor]:
    """The weights a rollout engine should serve: HF parameter names, LoRA deltas merged in.

    A PEFT model is read, not modified (no merge/unmerge round trip, so no drift in the trained base
    weights). Tied tensors (one storage under two names, e.g. embeddings and LM head) appear once, under
    the first name: vLLM ties them itself, and the LM head of a 135M model is a fifth of its bytes.

    `lora_targets_only`: only the tensors LoRA training can change (the merged target modules, completed to
    whole `FUSED_PROJECTIONS` groups, and fully trained `modules_to_save`). The rest is the frozen base,
    which the engines already serve, so these are every tensor that differs from the initial weights: sync
    them with `partial=True`.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        if lora_targets_only:
            raise ValueError("lora_targets_only needs a PEFT LoRA model: full fine-tuning changes every tensor")
        return _untied({name: t.detach() for name, t in model.state_dict().items()})
    base = model.get_base_model()
    deltas: dict[str, Tensor] = {}
    for module_name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.disable_adapters:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active:
                deltas[f"{module_name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in active)
    saved = f".modules_to_save.{model.active_adapter}."  # fully trained copies of modules (e.g. a head)
    merged: dict[str, Tensor] = {}
    trained: set[str] = set()
    for name, t in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name or (".modules_to_save." in name and saved not in name):
            continue
        weight = t.detach() + deltas[name].to(t.dtype) if name in deltas else t.detach()
        hf_name = name.replace(".base_layer.", ".").replace(saved, ".")
        merged[hf_name] = weight
        if name in deltas or saved in name:
            trained.add(hf_name)
    if lora_targets_only:
        if any(getattr(c, "bias", "none") != "none" for c in model.peft_config.values()):
            raise ValueError("lora_targets_only does not track biases trained by LoRA (bias != 'none')")
        sent = _with_fused_siblings(trained, merged)
        merged = {name: t for name, t in merged.items() if name in sent}
    return _untied(merged)


def _with_fused_siblings(names: set[str], available: Mapping[str, Tensor]) -> set[str]:
    """`names` plus the other parts of each fused projection group they belong to."""
    return names.union(*(fused_siblings(name, FUSED_PROJECTIONS) & available.keys() for name in names))


def fused_siblings(name: str, groups: Iterable[Sequence[str]]) -> set[str]:
    """Every part's tensor name of the fused group `name` belongs to (itself included; empty if in none):
    `model.layers.0.self_attn.q_proj.weight` -> the q, k and v projections' weights of layer 0."""
    parts = name.split(".")
    if len(parts) < 2:
        return set()
    *prefix, module, leaf = parts
    return {".".join([*prefix, part, leaf]) for group in groups if module in group for part in group}


def _untied(state: dict[str, Tensor]) -> dict[str, Tensor]:
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    kept: dict[str, Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = t
    return kept
