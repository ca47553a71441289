"""Rewards of (prompt, response) rows from any HF sequence-classification folder, tokenized as `prepare` does;
or, for a `train-dpo` export, the policy's implicit reward beta * log(pi / pi_ref) (`scorer_for` picks).

A plain in-process loop: the probes of all four benchmarks are a few thousand short sequences, which one
CPU thread scores in well under a minute, so Ray would only add start-up time. Rows are batched by length
(less padding) and the rewards returned in the callers' order.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ray_crm.assets import resolve_model
from ray_crm.config import POLICY_LOSSES, LoraConfig
from ray_crm.data.encode import PairEncoder
from ray_crm.models.logprobs import by_length, logprobs_by_length, rows_within_logit_budget


def model_folder(name_or_path: str) -> Path:
    """An HF folder, an asset alias, or a `train-rm` export folder (its `merged` model is used)."""
    path = Path(name_or_path).expanduser()
    if (path / "merged" / "config.json").is_file():
        path = path / "merged"
    return resolve_model(str(path))


def dpo_card(folder: Path) -> dict | None:
    """The model card of a `train-dpo` export whose `merged` policy is `folder`, or None."""
    card = folder.parent / "model_card.json"
    if not card.is_file():
        return None
    config = json.loads(card.read_text()).get("config", {})
    return config if config.get("loss", {}).get("type") in POLICY_LOSSES else None


def scorer_for(model: str, max_length: int, template: str = "auto", batch_size: int = 64,
               reward_index: int | None = None, threads: int = 1):
    """A `RewardScorer`, or an `ImplicitRewardScorer` for a DPO-trained policy."""
    card = dpo_card(model_folder(model))
    if card is not None:
        return ImplicitRewardScorer(model, card["model"]["name"], card["loss"]["beta"], max_length, batch_size, threads)
    return RewardScorer(model, max_length, template, batch_size, reward_index, threads)


class RewardScorer:
    def __init__(self, model: str, max_length: int, template: str = "auto", batch_size: int = 64,
                 reward_index: int | None = None, threads: int = 1) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(threads)
        self.path = model_folder(model)
        self.encoder = PairEncoder(str(self.path), max_length, template)  # type: ignore[arg-type]
        tok = self.encoder.tokenizer
        if tok.pad_token is None:  # decoder reward models ship without one
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32).eval()
        self.model.config.pad_token_id = tok.pad_token_id  # decoder heads find the last token by it
        labels = self.model.config.num_labels
        if reward_index is None and labels != 1:
            raise ValueError(f"{self.path} has {labels} outputs; say which is the reward with eval.reward_index")
        self.reward_index = reward_index or 0
        if self.reward_index >= labels:
            raise ValueError(f"eval.reward_index={self.reward_index} but {self.path} has {labels} outputs")
        self.batch_size = batch_size

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        enc = self.encoder.encode(list(prompts), list(responses))

        def rewards(idx: np.ndarray):
            features = {"input_ids": [enc.input_ids[i] for i in idx]}
            if enc.token_type_ids is not None:
                features["token_type_ids"] = [enc.token_type_ids[i] for i in idx]
            return self.model(**self.encoder.tokenizer.pad(features, return_tensors="pt")).logits[:, self.reward_index]

        return by_length(enc.input_ids, self.batch_size, rewards)


class ImplicitRewardScorer:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) over the response tokens of the chat text, the
    reference being the base model the policy was trained from: the policy read as a reward model. The
    reference's log-probs are remembered per process (`reference_logprobs`), so scoring several policies of
    one base on the same probes runs the reference once."""

    def __init__(self, policy: str, reference: str, beta: float, max_length: int, batch_size: int = 32,
                 threads: int = 1) -> None:
        import torch

        from ray_crm.models.loading import load_policy_model, tokenizer_at

        torch.set_num_threads(threads)
        self.path = model_folder(policy)
        self.encoder = PairEncoder(str(self.path), max_length, "chat")
        self.pad_id = tokenizer_at(self.path).pad_token_id
        self.policy = load_policy_model(self.path, LoraConfig(enabled=False), self.pad_id).eval()
        self.reference = str(resolve_model(reference))
        self.beta = beta
        self.batch_size = rows_within_logit_budget(self.policy.config.vocab_size, max_length, batch_size)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        enc = self.encoder.encode(list(prompts), list(responses))
        policy = logprobs_by_length(self.policy, enc.input_ids, enc.response_starts, self.pad_id, self.batch_size)
        model, memo = reference_logprobs(self.reference, self.pad_id)
        keys = [(tuple(ids), start) for ids, start in zip(enc.input_ids, enc.response_starts, strict=True)]
        missing = list(dict.fromkeys(k for k in keys if k not in memo))
        if missing:
            found = logprobs_by_length(model, [list(k[0]) for k in missing], [k[1] for k in missing], self.pad_id,
                                       self.batch_size)
            memo.update(zip(missing, found, strict=True))
        return self.beta * (policy - np.array([memo[k] for k in keys]))


@functools.lru_cache(maxsize=1)
def reference_logprobs(path: str, pad_id: int) -> tuple[Any, dict]:
    """The reference model at `path` and its memo of log-probs by (token ids, response start)."""
    from ray_crm.models.loading import load_policy_model

    return load_policy_model(path, LoraConfig(enabled=False), pad_id).eval(), {}
