"""The GRPO policy learner: one optimizer step per rollout batch, with GR, KL or reference resets.

Torch, transformers and DeepSpeed, no Ray: `ray_crm.rl.learner_group` runs one `PolicyLearner` per rank in
Ray actors joined by torch.distributed. Each rank holds a DeepSpeed engine (ZeRO `rl.zero_stage`) and takes
its slice (rank::world) of every batch, with every normalizer global, so W ranks step exactly as one would
(up to fp32 summation order). A step
- packs the rank's (prompt, response) token ids into right-padded micro-batches (`pack_sequences`);
- recomputes the old log-probs with the learner's own weights (verl does the same), so PPO's ratio starts at
  exactly 1 whatever precision the engines sampled in, and logs their gap to the engines' log-probs;
- takes the gradient of the Dr.GRPO loss (plus beta * KL for `kl`/`reset`), accumulated over the rank's
  micro-batches with `torch.autograd.grad` and summed over ranks by one flat all-reduce, so every rank holds
  the global gradient; GR's finite-difference estimator calls that twice (its perturbation uses the global
  g1). The final gradient goes to DeepSpeed as the gradient of a surrogate, sum(p * g), through
  `engine.backward`: ZeRO-1/2 reduce and partition it in their own hooks (averaging identical tensors leaves
  it unchanged), then `engine.step()` clips it to `rl.grad_clip` and steps Adam on each rank's partition.
  If the loss or the gradient is not finite (decided on global values, so every rank agrees) the step is
  skipped and reported (`skipped`, `skip_reason`): DeepSpeed never sees it, so the weights and Adam stay
  exactly as they were and a NaN never reaches the engines or a checkpoint.

Weights and Adam stay fp32 (DeepSpeed's bf16 is off); `rl.precision=bf16` runs the forward and backward
passes under bf16 autocast (AMX on recent Xeons, tensor cores on GPUs). Log-probs are those of the sampling
distribution, softmax(logits / temperature), as the engines report them. The reference policy (KL and
resets) is a snapshot of the trainable tensors only, on every rank, swapped in with
`torch.func.functional_call`: with LoRA it costs the adapters' size, not a second model.

A checkpoint (`save`/`load`, no pickle) holds each rank's optimizer partition and, from rank 0, the trainable
tensors, the reference and the step count.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.func import functional_call
from torch.nn.utils import get_total_norm

from ray_crm.checkpoint import load_state_tree, load_tensors, save_state_tree, save_tensors
from ray_crm.config import RLConfig
from ray_crm.models.loading import load_policy_model, tokenizer_at
from ray_crm.models.logprobs import token_logprobs
from ray_crm.rl.policy_losses import clipped_policy_loss, kl_to_reference
from ray_crm.rl.regularizers import regularizer
from ray_crm.rl.weights import policy_state_dict
from ray_crm.train.deepspeed_config import policy_deepspeed_config, prepare_deepspeed_env

# Transformer blocks (Llama/Qwen `layers.N`, GPT-2 `h.N`, others `blocks.N`): the only tensors GR perturbs.
BLOCK_PARAM = re.compile(r"\.(layers|h|blocks)\.\d+\.")
# A checkpoint's files besides each rank's `optim_rank{r}` state tree.
PARAMS, REFERENCE, LEARNER_STATE = "params.safetensors", "reference.safetensors", "learner.json"
# What ZeRO-1/2's `load_state_dict` reads of the optimizer's state dict; the rest is a loss scaler object,
# parameter-slice maps (rebuilt at start-up) and the fp32 master partition, which with fp32 weights is a
# copy of the module's own (restored from `PARAMS`).
ZERO_STATE_KEYS = ("base_optimizer_state", "clip_grad", "ds_version", "param_alignment_paddings")


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


def shard(batch: PolicyBatch, rank: int, world: int) -> PolicyBatch:
    """The sequences rank `rank` of `world` learns from: every world-th, from its rank on."""
    return replace(batch, prompt_ids=batch.prompt_ids[rank::world], response_ids=batch.response_ids[rank::world],
                   advantages=batch.advantages[rank::world], engine_logprobs=batch.engine_logprobs[rank::world])


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


def _ragged(values: Sequence[list[float]], mask: Tensor) -> Tensor:
    """Per-response lists laid out like `mask` (zeros elsewhere)."""
    out = torch.zeros_like(mask)
    for i, row in enumerate(values):
        positions = mask[i].nonzero().squeeze(-1)
        out[i, positions] = torch.tensor(row[: len(positions)], dtype=out.dtype)
    return out


class PolicyLearner:
    """A causal LM (LoRA or full) in a DeepSpeed engine, taking one regularized GRPO step per batch as rank
    `rank` of `world`. With world > 1 torch.distributed must already be up (`ray_crm.rl.learner_group`); a
    lone learner gets a process group of its own, in memory (DeepSpeed needs one)."""

    def __init__(self, model_path: str | Path, cfg: RLConfig, rank: int = 0, world: int = 1):
        backend = prepare_deepspeed_env(cfg.use_gpu)
        import deepspeed

        if not dist.is_initialized():
            if world > 1:
                raise RuntimeError(f"rank {rank} of {world}: join the process group before building the learner")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's device index: each rank sees one device (Ray's GPU)
        deepspeed.init_distributed(dist_backend=backend)  # adopts the group
        self.cfg, self.rank, self.world = cfg, rank, world
        self.tokenizer = tokenizer_at(model_path)
        self.pad_id = self.tokenizer.pad_token_id
        torch.manual_seed(cfg.seed)  # the same LoRA initialization on every rank
        model = load_policy_model(model_path, cfg.lora, self.pad_id).to("cuda" if cfg.use_gpu else "cpu")
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.perturb = [bool(BLOCK_PARAM.search(n)) for n in self.names]
        self.regularizer = regularizer(cfg.regularizer)
        if self.regularizer.perturbs_blocks and not any(self.perturb):
            raise ValueError(f"regularizer={cfg.regularizer} perturbs transformer-block parameters, and none is "
                             "trainable here")
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(self.params, lr=cfg.lr),
                                               config=policy_deepspeed_config(cfg, world))
        self.model = self.engine.module
        self.reference = self.snapshot() if self.regularizer.uses_reference else None
        self.step_count = 0

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the trainable tensors by name."""
        return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}

    def _logprobs(self, mb: MicroBatch, temperature: float, weights: dict[str, Tensor] | None = None) -> Tensor:
        device = self.params[0].device
        inputs = {"input_ids": mb.input_ids.to(device), "attention_mask": mb.attention_mask.to(device)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            out = functional_call(self.model, weights, args=(), kwargs=inputs) if weights else self.model(**inputs)
        return token_logprobs(out.logits, inputs["input_ids"], temperature).cpu()

    def _sum_over_ranks(self, tensors: list[Tensor]) -> list[Tensor]:
        """The tensors summed over ranks, by one all-reduce of a flat buffer (every rank gets the same sums)."""
        if self.world == 1:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]

    def step(self, batch: PolicyBatch) -> dict[str, float | str]:
        """One optimizer step on `batch` (the whole batch: every rank gets it and learns from its shard);
        returns what it measured (loss, KL, gradient norms, log-prob gap), the same on every rank, whether it
        was skipped (`skipped` 0/1, `skip_reason`), and this rank's own timings of the update (`time/learn_*`)."""
        cfg = self.cfg
        mine = shard(batch, self.rank, self.world)
        micro = pack_sequences(mine.prompt_ids, mine.response_ids, self.pad_id, cfg.micro_batch_size)
        advantages = torch.tensor(mine.advantages, dtype=torch.float32)
        norm = float(batch.max_new_tokens * len(batch.prompt_ids))  # Dr.GRPO's constant, over the whole batch
        tokens = float(sum(map(len, batch.response_ids)))  # all ranks' response tokens: the KL's token shares
        with torch.no_grad():
            old = [self._logprobs(mb, batch.temperature) for mb in micro]
            ref = ([self._logprobs(mb, batch.temperature, self.reference) for mb in micro]
                   if self.reference is not None else None)
        gap = sum(float(((o - _ragged(mine.engine_logprobs[mb.rows], mb.response_mask)).abs() * mb.response_mask).sum())
                  for o, mb in zip(old, micro, strict=True))
        (gap_sum,) = self._sum_over_ranks([torch.tensor([gap], dtype=torch.float64, device=self.params[0].device)])
        stats: dict[str, float] = {}
        calls: list[float] = []  # seconds of each full-batch gradient: GR's second one is its extra cost

        def grads() -> list[Tensor]:
            """grad of the batch loss on every rank: accumulated over this rank's micro-batches, then summed over
            ranks; the first call (at the unperturbed weights) fills `stats`."""
            t0 = time.perf_counter()
            total = [torch.zeros_like(p) for p in self.params]
            sums = torch.zeros(3, dtype=total[0].dtype, device=total[0].device)  # loss, KL, clip fraction
            for i, mb in enumerate(micro):
                logp = self._logprobs(mb, batch.temperature)
                loss, info = clipped_policy_loss(logp, old[i], advantages[mb.rows], mb.response_mask,
                                                 cfg.clip_eps, norm=norm)
                share = float(mb.response_mask.sum()) / max(tokens, 1.0)
                kl = torch.zeros(())
                if ref is not None:
                    kl = kl_to_reference(logp, ref[i], mb.response_mask)
                    loss = loss + cfg.kl_beta * share * kl
                for acc, g in zip(total, torch.autograd.grad(loss, self.params), strict=True):
                    acc.add_(g)
                sums += torch.stack([loss.detach().float().cpu(), kl.detach().float().cpu() * share,
                                     torch.tensor(info["policy/clip_fraction"] * share)]).to(sums)
            *total, sums = self._sum_over_ranks([*total, sums])
            if "policy/loss" not in stats:
                stats.update({"policy/loss": float(sums[0]), "policy/clip_fraction": float(sums[2])})
                if ref is not None:
                    stats["policy/kl_to_reference"] = float(sums[1])
            calls.append(time.perf_counter() - t0)
            return total

        t_estimate = time.perf_counter()
        g, estimator_stats = self.regularizer.estimator(grads, self.params, cfg, self.perturb)
        t_apply = time.perf_counter()
        # the split of the update: the gradient at the weights, what the regularizer's estimator adds on top
        # (GR: the perturbed second gradient, perturbation and restore), and the optimizer step
        stats["time/learn_grad_s"] = calls[0]
        stats["time/learn_regularizer_s"] = t_apply - t_estimate - calls[0]
        stats["time/learn_step_s"] = 0.0
        stats.update(estimator_stats)
        stats["policy/grad_norm"] = float(get_total_norm(g))
        stats["policy/engine_logprob_gap"] = float(gap_sum) / max(tokens, 1.0)
        stats["policy/response_tokens"] = tokens
        reason = ("non-finite loss" if not math.isfinite(stats["policy/loss"])
                  else "non-finite gradient" if not math.isfinite(stats["policy/grad_norm"]) else "")
        if not reason:
            self._apply(g)
            stats["time/learn_step_s"] = time.perf_counter() - t_apply
            self.step_count += 1
            if self.regularizer.resets_reference and self.step_count % cfg.reset_every == 0:
                self.reference = self.snapshot()
                stats["policy/reference_reset"] = 1.0
        return {**stats, "skipped": float(bool(reason)), "skip_reason": reason}

    def _apply(self, grads: list[Tensor]) -> None:
        """Hand the global gradient to DeepSpeed, which clips it and steps Adam (on its partition under ZeRO).

        The gradient of sum(p * g) is exactly g; backward through the engine lets ZeRO-1/2 reduce and
        partition it in their hooks (setting p.grad by hand would bypass them). Every rank holds the same g,
        so their average is g again."""
        surrogate = torch.stack([(p * g.detach()).sum() for p, g in zip(self.params, grads, strict=True)]).sum()
        self.engine.backward(surrogate)
        self.engine.step()

    def engine_weights(self) -> tuple[dict[str, Tensor], bool]:
        """The weights the engines should serve now, and whether they are partial (LoRA targets only). Under
        ZeRO 0-2 every rank holds them whole."""
        lora = self.cfg.lora.enabled
        return policy_state_dict(self.model, lora_targets_only=lora), lora

    def save(self, folder: Path) -> None:
        """This rank's part of a checkpoint in `folder`: its optimizer partition (`optim_rank{r}`), and from
        rank 0 the trainable tensors, the reference snapshot and the step count."""
        optimizer = self.engine.optimizer.state_dict()
        if self.engine.zero_optimization():
            optimizer = {key: optimizer[key] for key in ZERO_STATE_KEYS if key in optimizer}
        save_state_tree(folder, f"optim_rank{self.rank}", optimizer)
        if self.rank == 0:
            save_tensors(folder / PARAMS, self.snapshot())
            if self.reference is not None:
                save_tensors(folder / REFERENCE, self.reference)
            (folder / LEARNER_STATE).write_text(json.dumps(
                {"step": self.step_count, "world": self.world, "zero_stage": self.cfg.zero_stage}))

    def load(self, folder: Path) -> None:
        """Resume from `save`'s files: the weights first, then Adam (ZeRO rebuilds its fp32 master partition
        from the weights, which are fp32 themselves: exact)."""
        state = json.loads((folder / LEARNER_STATE).read_text())
        if (state["world"], state["zero_stage"]) != (self.world, self.cfg.zero_stage):
            raise ValueError(f"{folder} holds {state['world']} ranks' ZeRO-{state['zero_stage']} state; "
                             f"this learner has {self.world} under ZeRO-{self.cfg.zero_stage}")
        params = load_tensors(folder / PARAMS)
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(params[name])
        optimizer: Any = load_state_tree(folder, f"optim_rank{self.rank}")
        if self.engine.zero_optimization():  # ZeRO's loader takes every rank's state and picks its own
            ranks = [optimizer if r == self.rank else load_state_tree(folder, f"optim_rank{r}")
                     for r in range(self.world)]
            self.engine.optimizer.load_state_dict(ranks, load_from_fp32_weights=False)
        else:
            self.engine.optimizer.load_state_dict(optimizer)
        if self.reference is not None:
            self.reference = {k: v.to(self.params[0].device) for k, v in load_tensors(folder / REFERENCE).items()}
        self.step_count = state["step"]

    def save_policy(self, folder: Path) -> Path:
        """The trained policy as a plain HF folder (LoRA merged), e.g. for evaluation or serving."""
        base = self.model.get_base_model() if self.cfg.lora.enabled else self.model
        base.save_pretrained(folder, state_dict=policy_state_dict(self.model))
        self.tokenizer.save_pretrained(folder)
        return folder
