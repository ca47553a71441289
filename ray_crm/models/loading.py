"""Model and tokenizer loading (reward models and policies), LoRA, scoring and export: the one place that knows
transformers/peft quirks (pad tokens, dtypes, adapters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ray_crm.assets import resolve_model
from ray_crm.config import LoraConfig, ModelConfig
from ray_crm.models.packing import PackedSequences

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tokenizer_at(path: str | Path):
    """The tokenizer of an HF folder, with a pad token: decoder models (Llama, SmolLM2) ship without one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(model_cfg: ModelConfig):
    return tokenizer_at(resolve_model(model_cfg.name))


def with_lora(model, lora: LoraConfig, task_type: str | None = None):
    """`model` wrapped in a PEFT LoRA adapter if `lora.enabled`, else unchanged."""
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(model, PeftLoraConfig(
        task_type=task_type, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    ))


def load_reward_model(model_cfg: ModelConfig, pad_token_id: int):
    """A scalar-head AutoModelForSequenceClassification, wrapped in a PEFT LoRA adapter if configured."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(model_cfg.name), num_labels=1, dtype=DTYPES[model_cfg.precision]
    )
    model.config.pad_token_id = pad_token_id  # Llama heads need it to find the last token of a batch > 1
    return with_lora(model, model_cfg.lora, "SEQ_CLS")  # SEQ_CLS also trains the score head (modules_to_save)


def load_pair_model(model_cfg: ModelConfig, pad_token_id: int, policy: bool):
    """What trains on preference pairs: a causal LM policy (the DPO family) or a reward model."""
    if policy:
        return load_policy_model(resolve_model(model_cfg.name), model_cfg.lora, pad_token_id, model_cfg.precision)
    return load_reward_model(model_cfg, pad_token_id)


def load_policy_model(path: str | Path, lora: LoraConfig, pad_token_id: int, precision: str = "fp32"):
    """A causal LM for RL, wrapped in a PEFT LoRA adapter if configured; no KV cache (the learner only scores
    whole sequences). The LoRA init draws from torch's global generator: seed it for identical ranks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[precision])
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    return with_lora(model, lora)


def load_value_model(path: str | Path, lora: LoraConfig, pad_token_id: int):
    """PPO's critic: the backbone with a one-output token head (a value per position), the head zeroed so every
    value starts at 0 and trained in full beside the LoRA adapter (TOKEN_CLS's modules_to_save)."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    _, head = reward_head(model)
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    return with_lora(model, lora, "TOKEN_CLS")


def score(model, batch: dict[str, Tensor], with_representation: bool = False) -> tuple[Tensor, Tensor | None]:
    """Rewards [N] and, if asked, the pooled last-layer representation [N, H] that feeds the head."""
    out = model(**batch, output_hidden_states=with_representation)
    rewards = out.logits.squeeze(-1).float()
    if not with_representation:
        return rewards, None
    hidden, ids = out.hidden_states[-1], batch["input_ids"]
    hf = _classification_model(model)
    if hasattr(hf, "score"):  # decoders pool, as their head does, the last token that is not the pad id
        real = ids != hf.config.pad_token_id
        at = (torch.arange(ids.shape[1], device=ids.device) * real).argmax(-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), at]
    else:
        pooled = hidden[:, 0]  # encoders pool the first ([CLS]) token
    return rewards, pooled.float()


def _classification_model(model):
    """The transformers *ForSequenceClassification inside a DeepSpeed engine and/or a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_packed(model, packed: PackedSequences, with_representation: bool = False) -> tuple[Tensor, Tensor | None]:
    """`score` for packed sequences: the backbone runs on the packed rows under a block-diagonal mask, and the
    head on each sequence's pooling token, pooled as the model's own head pools a right-padded row (decoders:
    the last token that is not the pad id; encoders: the first token, through their pooler)."""
    hf = _classification_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    decoder = hasattr(hf, "score")
    inputs = packed.model_inputs(backbone, causal=decoder)
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    if padding_idx is not None:  # RoBERTa family: positions count from the pad id + 1
        inputs["position_ids"] = inputs["position_ids"] + padding_idx + 1
    hidden = backbone(**inputs).last_hidden_state
    if decoder:
        real = (packed.segment >= 0) & (packed.input_ids != hf.config.pad_token_id)
        offset = torch.zeros_like(packed.start).scatter_reduce(
            0, packed.segment[real], packed.position_ids[real], "amax")
        pooled = hidden[packed.row, packed.start + offset]
        rewards = hf.score(pooled)
    else:
        pooled = hidden[packed.first]
        if getattr(backbone, "pooler", None) is not None:  # BERT: the pooler is the backbone's
            rewards = hf.classifier(hf.dropout(backbone.pooler(pooled[:, None])))
        elif hasattr(hf.classifier, "out_proj"):  # RoBERTa: the head pools the first token itself
            rewards = hf.classifier(pooled[:, None])
        else:
            raise ValueError(f"packed scoring knows decoders, BERT and RoBERTa heads, not {type(hf).__name__}: "
                             "set train.pack_tokens=0")
    return rewards.squeeze(-1).float(), pooled.float() if with_representation else None


def pad_sequences(ids: list, token_types: list | None, pad_id: int,
                  device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Token lists (and their token type ids, if any) -> one right-padded batch."""
    longest = max(len(s) for s in ids)
    batch = {"input_ids": torch.full((len(ids), longest), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(ids), longest), dtype=torch.long)}
    if token_types is not None:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    for i, s in enumerate(ids):
        batch["input_ids"][i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        batch["attention_mask"][i, : len(s)] = 1
        if token_types is not None:
            batch["token_type_ids"][i, : len(s)] = torch.as_tensor(token_types[i], dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def pair_sequences(rows: dict[str, Any]) -> tuple[list, list | None]:
    """Chosen then rejected token lists (2N), and their token type ids if the model has them."""
    ids = list(rows["chosen_input_ids"]) + list(rows["rejected_input_ids"])
    types = None
    if "chosen_token_type_ids" in rows:
        types = list(rows["chosen_token_type_ids"]) + list(rows["rejected_token_type_ids"])
    return ids, types


def pad_pairs(rows: dict[str, Any], pad_id: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Chosen then rejected token lists -> one right-padded batch of 2N sequences."""
    return pad_sequences(*pair_sequences(rows), pad_id, device)


DATA_MANIFEST = "data_manifest.json"


def reward_head(model) -> tuple[str, torch.nn.Linear]:
    """The Linear layer that outputs a classification model's scalar (reward or value), and its module name:
    `score` (Llama, Qwen, GPT-2), `classifier` (BERT, MiniLM) or `classifier.out_proj` (RoBERTa, DeBERTa-v2)."""
    for name in ("score", "classifier", "classifier.out_proj"):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.Linear) and module.out_features == 1:
            return name, module
    raise ValueError(f"{type(model).__name__} has no scalar reward head (score, classifier or classifier.out_proj)")


@torch.no_grad()
def scale_reward_head(model, factor: float) -> str:
    """Multiply the model's reward by `factor` (its head's weight and bias); returns the head's module name."""
    name, head = reward_head(model)
    head.weight.mul_(factor)
    if head.bias is not None:
        head.bias.mul_(factor)
    return name


def _scale_adapter_head(adapter_dir: Path, head: str, factor: float) -> None:
    """The same scaling in a saved PEFT adapter, whose head is stored in full (modules_to_save)."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    keys = [k for k in tensors if k.endswith((f".{head}.weight", f".{head}.bias"))]
    if not keys:
        raise ValueError(f"{path} holds no tensor of the reward head '{head}' to scale")
    save_file({k: v * factor if k in keys else v for k, v in tensors.items()}, path, metadata={"format": "pt"})


def export_model(model_cfg: ModelConfig, weights_dir: Path, out: Path, card: dict[str, Any],
                 manifest: dict[str, Any] | None = None, policy: bool = False, reward_scale: float = 1.0) -> Path:
    """Write `out/merged` (plain HF folder, with the `prepare` manifest of its training data as `DATA_MANIFEST`:
    a PPO run bins its rollouts with the same extractors and bins), `out/adapter` (LoRA alone) and
    `out/model_card.json`. `policy`: a causal LM (DPO), else a sequence-classification reward model, whose
    reward is multiplied by `reward_scale` in both folders (the calibration of `train.calibrate_scale`)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto, kwargs = (AutoModelForCausalLM, {}) if policy else (AutoModelForSequenceClassification, {"num_labels": 1})
    tok = load_tokenizer(model_cfg)
    merged_dir = out / "merged"
    if model_cfg.lora.enabled:
        from peft import PeftModel

        base = auto.from_pretrained(resolve_model(model_cfg.name), dtype=torch.float32, **kwargs)
        base.config.pad_token_id = tok.pad_token_id
        model = PeftModel.from_pretrained(base, weights_dir).merge_and_unload()
        shutil.copytree(weights_dir, out / "adapter", dirs_exist_ok=True)
    else:
        model = auto.from_pretrained(weights_dir, dtype=torch.float32)
    if reward_scale != 1.0:
        if policy:
            raise ValueError("reward_scale applies to reward models; a policy's implicit reward is scaled by beta")
        head = scale_reward_head(model, reward_scale)
        if model_cfg.lora.enabled:
            _scale_adapter_head(out / "adapter", head, reward_scale)
    model.save_pretrained(merged_dir, safe_serialization=True)
    tok.save_pretrained(merged_dir)
    if manifest is not None:
        (merged_dir / DATA_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    (out / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
    return merged_dir
