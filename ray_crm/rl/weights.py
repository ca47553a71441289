"""PURE: the policy weights that travel from the learner to the rollout engines.

Two jobs, both torch/numpy only:
- `policy_state_dict`: the learner's current policy as a plain HF state dict (LoRA merged in, without
  touching the trained model), which is what vLLM's `load_weights` understands;
- `PackedWeights`: that state dict as uint8 numpy views, so one `ray.put` copies it into the object store
  and every engine on the node maps it without another copy (torch tensors would be pickled; vLLM's
  `collective_rpc` would turn them into lists).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PackedWeights:
    """A state dict as raw bytes: one uint8 array per tensor plus what it takes to view it back."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    buffers: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) views over the buffers, which may be read-only object-store memory: read only."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, dtype, shape, buf in zip(self.names, self.dtypes, self.shapes, self.buffers, strict=True):
                yield name, torch.from_numpy(buf).view(getattr(torch, dtype)).reshape(shape)


def pack_state_dict(state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> PackedWeights:
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
    return PackedWeights(tuple(names), tuple(dtypes), tuple(shapes), tuple(buffers))


@torch.no_grad()
def policy_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights a rollout engine should serve: HF parameter names, LoRA deltas merged in.

    A PEFT model is read, not modified (no merge/unmerge round trip, so no drift in the trained base
    weights). Tied tensors (one storage under two names, e.g. embeddings and LM head) appear once, under
    the first name: vLLM ties them itself, and the LM head of a 135M model is a fifth of its bytes.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
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
    for name, t in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name or (".modules_to_save." in name and saved not in name):
            continue
        weight = t.detach() + deltas[name].to(t.dtype) if name in deltas else t.detach()
        merged[name.replace(".base_layer.", ".").replace(saved, ".")] = weight
    return _untied(merged)


def _untied(state: dict[str, Tensor]) -> dict[str, Tensor]:
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    kept: dict[str, Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = t
    return kept
