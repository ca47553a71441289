"""Log-probabilities of a causal LM's own tokens, and DPO's implicit reward beta * log(pi / pi_ref).

Pure torch over a model call, no Ray: the RL learner and the DPO trainer both score sequences here, and
`ray-crm eval` and DPO's reference actors score many at once (`logprobs_by_length`). The
reference of DPO is the same model with its LoRA adapter switched off, so it costs no second copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ray_crm.models.packing import PackedSequences

# Floats in one scoring batch's logits (512 MiB in fp32): a causal LM's full-vocabulary logits, not its weights,
# set the memory of scoring many sequences at once (128 x 192 tokens x 49k vocabulary is 4.8 GB, before the
# log-softmax's temporaries).
LOGIT_BUDGET = 2**27


def rows_within_logit_budget(vocab_size: int, length: int, limit: int) -> int:
    """How many sequences of `length` tokens one forward may score (at most `limit`, at least 1) so that their
    logits stay within `LOGIT_BUDGET` floats."""
    return max(1, min(limit, LOGIT_BUDGET // max(1, vocab_size * length)))


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) of each next token: [B, L - 1], in fp32 whatever the model's dtype."""
    logits = logits[:, :-1].float()
    if temperature != 1.0:  # no full-size copy in the common case
        logits = logits / max(temperature, 1e-6)
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


def sequence_logprobs(model, batch: dict[str, Tensor] | PackedSequences, starts: Sequence[int] | Tensor) -> Tensor:
    """Sum of log p(token) over each sequence's response tokens [B]: a right-padded `batch`, or packed rows."""
    if isinstance(batch, PackedSequences):
        logp = token_logprobs(model(**batch.model_inputs(model, causal=True)).logits, batch.input_ids)
        sequence, scored = batch.next_token_targets(starts)
        return logp.new_zeros(len(batch.row)).index_add_(0, sequence[scored], logp[scored])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = response_mask(batch["attention_mask"], starts)
    return (token_logprobs(logits, batch["input_ids"]) * mask).sum(-1)


def implicit_reward(model, batch: dict[str, Tensor] | PackedSequences, starts: Sequence[int] | Tensor, beta: float,
                    reference: Tensor | None = None) -> Tensor:
    """beta * (log pi(y|x) - log pi_ref(y|x)) per sequence [B]. `reference`: pi_ref's log-probs [B] computed
    beforehand; without it pi_ref is `model` (a PeftModel, or a DeepSpeed engine around one) with its adapter
    disabled, scored without gradient."""
    logp = sequence_logprobs(model, batch, starts)
    if reference is None:
        with torch.no_grad(), getattr(model, "module", model).disable_adapter():
            reference = sequence_logprobs(model, batch, starts)
    return beta * (logp - reference.to(logp.dtype))


def logprobs_by_length(model, input_ids: Sequence[list[int]], starts: Sequence[int], pad_id: int,
                       batch_size: int, device: str = "cpu") -> np.ndarray:
    """`sequence_logprobs` of every sequence, in batches of like length, in the input order."""
    from ray_crm.models.loading import pad_sequences

    starts = np.asarray(starts)

    def batch(idx: np.ndarray):
        inputs = pad_sequences([input_ids[i] for i in idx], None, pad_id, device)
        return sequence_logprobs(model, inputs, starts[idx]).cpu()

    return by_length(input_ids, batch_size, batch)


def by_length(input_ids: Sequence[list[int]], batch_size: int, score_batch) -> np.ndarray:
    """`score_batch(indices)` over batches of similar length (less padding), in inference mode; the scores in
    the input order, as float64."""
    order = np.argsort([len(ids) for ids in input_ids], kind="stable")
    scores = np.empty(len(order), np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        with torch.inference_mode():
            scores[idx] = score_batch(idx).float().numpy()
    return scores
