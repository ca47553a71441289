"""Rewards of (prompt, response) rows from any HF sequence-classification folder, tokenized as `prepare` does.

A plain in-process loop: the probes of all four benchmarks are a few thousand short sequences, which one
CPU thread scores in well under a minute, so Ray would only add start-up time. Rows are batched by length
(less padding) and the rewards returned in the callers' order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ray_crm.assets import resolve_model
from ray_crm.data.encode import PairEncoder


def model_folder(name_or_path: str) -> Path:
    """An HF folder, an asset alias, or a `train-rm` export folder (its `merged` model is used)."""
    path = Path(name_or_path).expanduser()
    if (path / "merged" / "config.json").is_file():
        path = path / "merged"
    return resolve_model(str(path))


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
        import torch

        enc = self.encoder.encode(list(prompts), list(responses))
        order = np.argsort([len(ids) for ids in enc.input_ids], kind="stable")
        rewards = np.empty(len(order), np.float64)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            features = {"input_ids": [enc.input_ids[i] for i in idx]}
            if enc.token_type_ids is not None:
                features["token_type_ids"] = [enc.token_type_ids[i] for i in idx]
            batch = self.encoder.tokenizer.pad(features, return_tensors="pt")
            with torch.inference_mode():
                rewards[idx] = self.model(**batch).logits[:, self.reward_index].float().numpy()
        return rewards
