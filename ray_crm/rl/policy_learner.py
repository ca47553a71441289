"""The GRPO policy learner: one optimizer step per rollout batch, with GR, KL or reference resets.

Plain torch and transformers (no Ray): `ray_crm.rl.grpo_trainer` runs it inside a Ray actor. A step
- packs the batch's (prompt, response) token ids into right-padded micro-batches (`pack_sequences`);
- recomputes the old log-probs with the learner's own weights (verl does the same), so PPO's ratio starts at
  exactly 1 whatever precision the engines sampled in, and logs their gap to the engines' log-probs;
- takes the gradient of the Dr.GRPO loss (plus beta * KL for `kl`/`reset`), through the finite-difference GR
  estimator for `gr`, accumulated over micro-batches; clips it and steps Adam, unless the loss or the
  (combined) gradient is not finite: then the step is skipped and reported (`skipped`, `skip_reason`), and
  the weights and Adam are left exactly as they were, so a NaN never reaches the engines or a checkpoint.

Weights and Adam stay fp32; `rl.precision=bf16` runs the forward and backward passes under bf16 autocast
(AMX on recent Xeons, tensor cores on GPUs). Log-probs are those of the sampling distribution, softmax(logits / temperature), as the engines report them.
The reference policy (KL and resets) is a snapshot of the trainable tensors only, swapped in with
`torch.func.functional_call`: with LoRA it costs the adapters' size, not a second model.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

from ray_crm.config import RLConfig
from ray_crm.rl.policy_losses import clipped_policy_loss, gradient_regularized_grads, kl_to_reference
from ray_crm.rl.weights import policy_state_dict

# Transformer blocks (Llama/Qwen `layers.N`, GPT-2 `h.N`, others `blocks.N`): the only tensors GR perturbs.
BLOCK_PARAM = re.compile(r"\.(layers|h|blocks)\.\d+\.")


@dataclass
class PolicyBatch:
    """One rollout batch as the learner needs it: token ids, where each response starts, advantages."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: list[float]  # one per sequence
    engine_logprobs: list[list[float]]  # per response token, as the engines sampled them
    temperature: float
    max_new_tokens: int  # Dr.GRPO divides the token sum by this constant (times the sequence count)


@dataclass
class MicroBatch:
    input_ids: Tensor  # [B, L] right-padded
    attention_mask: Tensor  # [B, L]
    response_mask: Tensor  # [B, L - 1]: 1 where position t+1 is a response token
    rows: slice  # which sequences of the batch


def pack_sequences(prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int,
                   micro_batch_size: int) -> list[MicroBatch]:
    """Right-padded micro-batches of prompt + response; the response mask is aligned with next-token logits."""
    out = []
    for start in range(0, len(prompt_ids), micro_batch_size):
        rows = slice(start, min(start + micro_batch_size, len(prompt_ids)))
        seqs = [p + r for p, r in zip(prompt_ids[rows], response_ids[rows], strict=True)]
        length = max(map(len, seqs))
        ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), length), dtype=torch.long)
        resp = torch.zeros((len(seqs), length - 1))
        for i, (p, seq) in enumerate(zip(prompt_ids[rows], seqs, strict=True)):
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            resp[i, len(p) - 1 : len(seq) - 1] = 1
        out.append(MicroBatch(ids, attn, resp, rows))
    return out


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T) of each next token: [B, L - 1], in fp32 whatever the model's dtype."""
    logits = logits[:, :-1].float() / max(temperature, 1e-6)
    picked = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _ragged(values: Sequence[list[float]], mask: Tensor) -> Tensor:
    """Per-response lists laid out like `mask` (zeros elsewhere)."""
    out = torch.zeros_like(mask)
    for i, row in enumerate(values):
        positions = mask[i].nonzero().squeeze(-1)
        out[i, positions] = torch.tensor(row[: len(positions)], dtype=out.dtype)
    return out


class PolicyLearner:
    """A causal LM (LoRA or full) with Adam, taking one regularized GRPO step per batch."""

    def __init__(self, model_path: str | Path, cfg: RLConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.model_path = str(model_path)
        device = "cuda" if cfg.use_gpu else "cpu"
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
        if cfg.lora.enabled:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
            ))
        model.config.use_cache = False
        self.model = model
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.perturb = [bool(BLOCK_PARAM.search(n)) for n in self.names]
        if self.cfg.regularizer == "gr" and not any(self.perturb):
            raise ValueError("regularizer=gr perturbs transformer-block parameters, and none is trainable here")
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.reference = self._snapshot() if cfg.regularizer in ("kl", "reset") else None
        self.step_count = 0

    def _snapshot(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}

    def _logprobs(self, mb: MicroBatch, temperature: float, weights: dict[str, Tensor] | None = None) -> Tensor:
        device = self.params[0].device
        inputs = {"input_ids": mb.input_ids.to(device), "attention_mask": mb.attention_mask.to(device)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            out = functional_call(self.model, weights, args=(), kwargs=inputs) if weights else self.model(**inputs)
        return token_logprobs(out.logits, inputs["input_ids"], temperature).cpu()

    def step(self, batch: PolicyBatch) -> dict[str, float | str]:
        """One optimizer step on `batch`; returns what it measured (loss, KL, gradient norms, log-prob gap) and
        whether it was skipped (`skipped` 0/1, `skip_reason`)."""
        cfg = self.cfg
        micro = pack_sequences(batch.prompt_ids, batch.response_ids, self.pad_id, cfg.micro_batch_size)
        advantages = torch.tensor(batch.advantages, dtype=torch.float32)
        norm = float(batch.max_new_tokens * len(batch.prompt_ids))
        with torch.no_grad():
            old = [self._logprobs(mb, batch.temperature) for mb in micro]
            ref = ([self._logprobs(mb, batch.temperature, self.reference) for mb in micro]
                   if self.reference is not None else None)
        tokens = sum(float(mb.response_mask.sum()) for mb in micro)
        gap = sum(float(((o - _ragged(batch.engine_logprobs[mb.rows], mb.response_mask)).abs() * mb.response_mask).sum())
                  for o, mb in zip(old, micro, strict=True)) / max(tokens, 1.0)
        stats: dict[str, float] = {}

        def grads() -> list[Tensor]:
            """grad of the batch loss, accumulated over micro-batches; the first call (at the unperturbed
            weights) fills `stats`."""
            total = [torch.zeros_like(p) for p in self.params]
            loss_sum = kl_sum = clip_sum = 0.0
            for i, mb in enumerate(micro):
                logp = self._logprobs(mb, batch.temperature)
                loss, info = clipped_policy_loss(logp, old[i], advantages[mb.rows], mb.response_mask,
                                                 cfg.clip_eps, norm=norm)
                share = float(mb.response_mask.sum()) / max(tokens, 1.0)
                if ref is not None:
                    kl = kl_to_reference(logp, ref[i], mb.response_mask)
                    loss = loss + cfg.kl_beta * share * kl
                    kl_sum += float(kl) * share
                for acc, g in zip(total, torch.autograd.grad(loss, self.params), strict=True):
                    acc.add_(g)
                loss_sum += float(loss)
                clip_sum += info["policy/clip_fraction"] * share
            if "policy/loss" not in stats:
                stats.update({"policy/loss": loss_sum, "policy/clip_fraction": clip_sum})
                if ref is not None:
                    stats["policy/kl_to_reference"] = kl_sum
            return total

        if cfg.regularizer == "gr":
            g, gr_stats = gradient_regularized_grads(grads, self.params, cfg.gr_gamma, cfg.gr_fd_eps,
                                                     cfg.gr_g_clip, self.perturb)
            stats.update(gr_stats)
        else:
            g = grads()
        for p, gi in zip(self.params, g, strict=True):
            p.grad = gi.to(p.dtype)
        stats["policy/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        stats["policy/engine_logprob_gap"] = gap
        stats["policy/response_tokens"] = tokens
        reason = ("non-finite loss" if not math.isfinite(stats["policy/loss"])
                  else "non-finite gradient" if not math.isfinite(stats["policy/grad_norm"]) else "")
        if not reason:
            self.optimizer.step()
            self.step_count += 1
            if cfg.regularizer == "reset" and self.step_count % cfg.reset_every == 0:
                self.reference = self._snapshot()
                stats["policy/reference_reset"] = 1.0
        self.optimizer.zero_grad(set_to_none=True)
        return {**stats, "skipped": float(bool(reason)), "skip_reason": reason}

    def engine_weights(self) -> tuple[dict[str, Tensor], bool]:
        """The weights the engines should serve now, and whether they are partial (LoRA targets only)."""
        lora = self.cfg.lora.enabled
        return policy_state_dict(self.model, lora_targets_only=lora), lora

    def state(self) -> dict:
        """Everything a resumed run needs: trainable tensors, Adam, the reference snapshot, the step."""
        return {"params": self._snapshot(), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "reference": self.reference, "step": self.step_count}

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.reference = state["reference"]
        self.step_count = state["step"]

    def save_policy(self, folder: Path) -> Path:
        """The trained policy as a plain HF folder (LoRA merged), e.g. for evaluation or serving."""
        from transformers import AutoTokenizer

        base = self.model.get_base_model() if self.cfg.lora.enabled else self.model
        base.save_pretrained(folder, state_dict=policy_state_dict(self.model))
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(folder)
        return folder
