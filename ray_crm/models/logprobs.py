"""Log-probabilities of a causal LM's own tokens, and DPO's implicit reward beta * log(pi / pi_ref).

Pure torch over a model call, no Ray: the RL learner and the DPO trainer both score sequences here. The
reference of DPO is the same model with its LoRA adapter switched off, so it costs no second copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) of each next token: [B, L - 1], in fp32 whatever the model's dtype."""
    logits = logits[:, :-1].float() / max(temperature, 1e-6)
    picked = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / T) at each position that predicts a next token: [B, L - 1], fp32."""
    logp = torch.log_softmax(logits[:, :-1].float() / max(temperature, 1e-6), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_mask(attention_mask: Tensor, starts: Sequence[int] | Tensor) -> Tensor:
    """[B, L - 1]: 1 where the next token (position t + 1) is a real response token, aligned with
    `token_logprobs`. A response starting at 0 (its prompt cut away) is scored from its second token."""
    starts = torch.as_tensor(starts, device=attention_mask.device).view(-1, 1)
    positions = torch.arange(1, attention_mask.shape[1], device=attention_mask.device).view(1, -1)
    return ((positions >= starts) & attention_mask[:, 1:].bool()).float()


def sequence_logprobs(model, batch: dict[str, Tensor], starts: Sequence[int] | Tensor) -> Tensor:
    """Sum of log p(token) over each sequence's response tokens [B], right-padded `batch`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = response_mask(batch["attention_mask"], starts)
    return (token_logprobs(logits, batch["input_ids"]) * mask).sum(-1)


def implicit_reward(model, batch: dict[str, Tensor], starts: Sequence[int] | Tensor, beta: float) -> Tensor:
    """beta * (log pi(y|x) - log pi_ref(y|x)) per sequence [B]; pi_ref is `model` (a PeftModel, or a DeepSpeed
    engine around one) with its adapter disabled, scored without gradient."""
    logp = sequence_logprobs(model, batch, starts)
    with torch.no_grad(), getattr(model, "module", model).disable_adapter():
        ref = sequence_logprobs(model, batch, starts)
    return beta * (logp - ref)
