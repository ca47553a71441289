"""The policy learner: one rollout batch -> `rl.epochs` x `rl.minibatches` regularized PPO-clip updates (GR, KL
or reference resets), with advantages from the driver (Dr.GRPO, RLOO) or from its own critic (PPO's GAE).

Torch, transformers and DeepSpeed, no Ray: `ray_crm.rl.learner_group` runs one `PolicyLearner` per rank in
Ray actors joined by torch.distributed. Each rank holds a DeepSpeed engine (ZeRO `rl.zero_stage`,
`DeepSpeedLearner`) and takes its slice (rank::world) of every minibatch, with every normalizer global, so W
ranks step exactly as one would (up to fp32 summation order). A step
- splits the batch into `rl.minibatches` minibatches (every k-th sequence) and lays the rank's (prompt,
  response) token ids of each out in micro-batches of `rl.micro_batch_size` sequences (`micro_batches`): one
  right-padded row each, or (`rl.pack_tokens`) packed whole into rows with position ids restarting at each
  sequence (the model then masks attention block-diagonally, so no padding goes through the linear layers);
- recomputes the old log-probs with the learner's own weights (verl does the same), so PPO's ratio starts at
  exactly 1 whatever precision the engines sampled in, and logs their gap to the engines' log-probs; when the
  batch takes a single update (`rl.epochs=1`, `rl.minibatches=1`, no critic) they are the first gradient pass's
  own log-probs, detached, which saves a forward pass of the policy per step;
- with `rl.advantage=gae`, scores every token with the critic (`ValueLearner`), builds per-token rewards (the
  sequence's score on its last token, minus `rl.kl_in_reward` x the k1 KL to the initial policy) and runs GAE,
  whitening the advantages over every rank's tokens;
- for each epoch and minibatch, takes the gradient of the Dr.GRPO loss (plus beta * KL for `kl`/`reset`),
  accumulated over the rank's micro-batches with `torch.autograd.grad` and summed over ranks, so every rank
  holds the global gradient; GR's finite-difference estimator calls that twice (its perturbation uses the
  global g1); the result steps Adam through DeepSpeed (`DeepSpeedLearner.apply`), and the critic takes its own
  step on the clipped value loss. If a loss or gradient is not finite (decided on global values, so every rank
  agrees) that update and the rest of the batch's are skipped and reported (`skip_reason`; `skipped` when no
  update was taken): DeepSpeed never sees it, so a NaN never reaches the engines or a checkpoint.

`rl.precision=bf16` runs the forward and backward passes under bf16 autocast (AMX on recent Xeons, tensor
cores on GPUs); weights and Adam stay fp32. Log-probs are those of the sampling distribution,
softmax(logits / temperature), as the engines report them. The reference policy (KL, resets, the KL in PPO's
reward) is a snapshot of the trainable tensors only, on every rank, swapped in with
`DeepSpeedLearner.swapped_in` (copied in place and restored, so it also holds under ZeRO-3): with LoRA it costs
the adapters' size, not a second model.

A checkpoint (`save`/`load`, no pickle) holds each rank's optimizer partitions and, from rank 0, the trainable
tensors (policy and critic), the reference and the step count.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils import get_total_norm

from ray_crm.assets import resolve_model
from ray_crm.checkpoint import load_tensors, save_tensors
from ray_crm.config import RLConfig
from ray_crm.models.loading import load_policy_model, tokenizer_at
from ray_crm.models.logprobs import token_entropy, token_logprobs
from ray_crm.models.packing import pack_sequences
from ray_crm.rl.advantages import gae, token_rewards
from ray_crm.rl.policy_losses import clipped_policy_loss, kl_to_reference
from ray_crm.rl.regularizers import regularizer
from ray_crm.rl.value_learner import ValueLearner
from ray_crm.rl.weights import policy_state_dict
from ray_crm.train.deepspeed_config import policy_deepspeed_config
from ray_crm.train.learner import DeepSpeedLearner, join_process_group, trainable

# Transformer blocks (Llama/Qwen `layers.N`, GPT-2 `h.N`, others `blocks.N`): the only tensors GR perturbs.
BLOCK_PARAM = re.compile(r"\.(layers|h|blocks)\.\d+\.")
# A checkpoint's files besides the engines' (`DeepSpeedLearner.save_engine`).
REFERENCE, INITIAL, LEARNER_STATE = "reference.safetensors", "initial.safetensors", "learner.json"
# Statistics of each update averaged over the batch's updates (the rest: the first update's, or summed times).
MEAN_STATS = ("policy/loss", "policy/clip_fraction", "policy/kl_to_reference", "policy/grad_norm", "gr/g1_norm",
              "gr/g2_norm", "critic/loss", "critic/clip_fraction", "critic/skipped")


@dataclass
class PolicyBatch:
    """One rollout batch as the learner needs it: token ids, where each response starts, advantages."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: list[float]  # one per sequence; empty when the learner's critic estimates them (`rewards`)
    engine_logprobs: list[list[float]]  # per response token, as the engines sampled them
    temperature: float
    max_new_tokens: int  # Dr.GRPO divides the token sum by this constant (times the sequence count)
    rewards: list[float] | None = None  # one per sequence: the scores GAE turns into per-token advantages
    measure_kl: bool = True  # measure the KL to the initial policy on this batch (`rl.monitor.kl_every`)


@dataclass
class MicroBatch:
    """Sequences laid out in R rows of L tokens: one per row (right-padded; `position_ids` None) or packed
    several to a row (`position_ids` restart at each sequence, and no attention mask: the model then keeps
    attention inside each sequence)."""

    input_ids: Tensor  # [R, L]
    attention_mask: Tensor  # [R, L]: 1 on real tokens
    response_mask: Tensor  # [R, L - 1]: 1 where position t+1 is a response token
    rows: slice  # which sequences of the batch
    sequence: Tensor  # [R, L - 1]: index (within `rows`) of the sequence whose token position t+1 is; -1 on padding
    position_ids: Tensor | None = None

    def model_inputs(self, device: torch.device) -> dict[str, Tensor]:
        if self.position_ids is None:
            return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}
        return {"input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device)}

    def per_token(self, values: Tensor) -> Tensor:
        """Per-sequence `values` [B] laid out like `response_mask` (zeros off the responses)."""
        return values[self.sequence.clamp(min=0)] * self.response_mask


def shard(batch: PolicyBatch, rank: int, world: int) -> PolicyBatch:
    """The sequences rank `rank` of `world` learns from (every world-th, from its rank on); with rank k of
    `rl.minibatches`, the k-th minibatch."""
    rows = slice(rank, None, world)
    return replace(batch, prompt_ids=batch.prompt_ids[rows], response_ids=batch.response_ids[rows],
                   advantages=batch.advantages[rows], engine_logprobs=batch.engine_logprobs[rows],
                   rewards=None if batch.rewards is None else batch.rewards[rows])


def micro_batches(prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int,
                  micro_batch_size: int, pack_tokens: int = 0) -> list[MicroBatch]:
    """Micro-batches of `micro_batch_size` prompt + response sequences, each packed into rows of up to
    `pack_tokens` tokens (0: one right-padded row per sequence); masks aligned with next-token logits."""
    out = []
    for start in range(0, len(prompt_ids), micro_batch_size):
        rows = slice(start, min(start + micro_batch_size, len(prompt_ids)))
        prompts = prompt_ids[rows]
        packed = pack_sequences([p + r for p, r in zip(prompts, response_ids[rows], strict=True)], pad_id, pack_tokens)
        sequence, resp = packed.next_token_targets([len(p) for p in prompts])
        out.append(MicroBatch(packed.input_ids, (packed.segment >= 0).long(), resp.float(), rows, sequence,
                              packed.position_ids if packed.packed else None))
    return out


def _ragged(values: Sequence[list[float]], mb: MicroBatch) -> Tensor:
    """Per-response lists (one per sequence of `mb`) laid out like its response mask (zeros elsewhere)."""
    out = torch.zeros_like(mb.response_mask)
    for i, row in enumerate(values):
        r, t = ((mb.sequence == i) & mb.response_mask.bool()).nonzero(as_tuple=True)
        out[r, t] = torch.tensor(row[: len(t)], dtype=out.dtype)
    return out


@dataclass
class Minibatch:
    """One minibatch as this rank holds it, with what its updates reuse: the old (and reference) log-probs, the
    advantages per micro-batch ([B] or, from GAE, [B, T]), and for the critic its values and returns."""

    micro: list[MicroBatch]
    norm: float  # Dr.GRPO's constant: the generation budget times the minibatch's sequences (all ranks)
    tokens: float  # the minibatch's response tokens over all ranks: each micro-batch's share of a token mean
    old: list[Tensor] = field(default_factory=list)  # empty until the first gradient pass when it supplies them
    ref: list[Tensor] | None = None
    initial: list[Tensor] | None = None  # the monitor's: log-probs under the initial policy
    engine: list[Tensor] = field(default_factory=list)  # the engines' log-probs, laid out like the response mask
    entropy: list[Tensor] = field(default_factory=list)  # of the rollouts' policy, per token
    advantages: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    returns: list[Tensor] = field(default_factory=list)


class PolicyLearner(DeepSpeedLearner):
    """A causal LM (LoRA or full) in a DeepSpeed engine, taking the regularized PPO-clip updates of one batch as
    rank `rank` of `world` (and, for `rl.advantage=gae`, holding the critic). With world > 1 torch.distributed
    must already be up (`ray_crm.rl.learner_group`)."""

    def __init__(self, model_path: str | Path, cfg: RLConfig, rank: int = 0, world: int = 1):
        join_process_group(cfg.use_gpu, rank, world)
        self.cfg = cfg
        self.tokenizer = tokenizer_at(model_path)
        self.pad_id = self.tokenizer.pad_token_id
        torch.manual_seed(cfg.seed)  # the same LoRA initialization on every rank
        model = load_policy_model(model_path, cfg.lora, self.pad_id).to("cuda" if cfg.use_gpu else "cpu")
        self.regularizer = regularizer(cfg.regularizer)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if self.regularizer.perturbs_blocks and not any(BLOCK_PARAM.search(n) for n in names):
            raise ValueError(f"regularizer={cfg.regularizer} perturbs transformer-block parameters, and none is "
                             "trainable here")
        super().__init__(model, torch.optim.Adam(trainable(model), lr=cfg.lr), policy_deepspeed_config(cfg, world),
                         rank, world)
        self.perturb = [bool(BLOCK_PARAM.search(n)) for n in self.names]
        uses_reference = self.regularizer.uses_reference or (cfg.advantage == "gae" and cfg.kl_in_reward > 0)
        self.reference = self.snapshot() if uses_reference else None
        # the monitor's KL to the initial policy: the reference itself when it never resets, else its own snapshot
        shared = self.reference is not None and not self.regularizer.resets_reference
        self.initial = (None if not cfg.monitor.kl_to_initial else self.reference if shared else self.snapshot())
        self.critic = (ValueLearner(resolve_model(cfg.critic.model) if cfg.critic.model else model_path, cfg,
                                    self.pad_id, rank, world) if cfg.advantage == "gae" else None)
        # one update per batch, on-policy: its first gradient pass is at the old weights and yields the old log-probs
        self.old_from_first_pass = cfg.epochs == 1 and cfg.minibatches == 1 and self.critic is None
        self.step_count = 0

    def _logprobs(self, mb: MicroBatch, temperature: float, entropy: list[Tensor] | None = None) -> Tensor:
        """Per-token log-probs [B, L - 1]; appends the entropies to `entropy`."""
        device = self.params[0].device
        inputs = {**mb.model_inputs(device), "use_cache": False}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            out = self.model(**inputs)
        if entropy is not None:
            entropy.append(token_entropy(out.logits.detach(), temperature).cpu())
        return token_logprobs(out.logits, inputs["input_ids"], temperature).cpu()

    def step(self, batch: PolicyBatch) -> dict[str, float | str]:
        """The updates of `batch` (the whole batch: every rank gets it and learns from its shard); returns what
        they measured (loss, KL, gradient norms, log-prob gap; averaged over updates), the same on every rank,
        whether the batch was skipped (`skipped` 0/1: no update taken, `skip_reason`), and this rank's own
        timings of the updates (`time/learn_*`, summed)."""
        cfg = self.cfg
        if self.critic is not None and batch.rewards is None:
            raise ValueError("rl.advantage=gae: the batch must carry the rewards its critic turns into advantages")
        if self.critic is None and len(batch.advantages) != len(batch.prompt_ids):
            raise ValueError(f"the batch has {len(batch.prompt_ids)} sequences and {len(batch.advantages)} advantages")
        timings = dict.fromkeys(("time/learn_grad_s", "time/learn_regularizer_s", "time/learn_step_s"), 0.0)
        if self.critic is not None:
            timings["time/learn_critic_s"] = 0.0  # the critic's values and its updates: PPO's cost over GRPO
        parts = self._minibatches(batch, timings)
        sums: dict[str, list[float]] = defaultdict(list)
        updates, reason = 0, ""
        for _ in range(cfg.epochs):
            for part in parts:
                update, reason = self._update(part, batch.temperature, timings)
                if not reason and self.critic is not None:
                    t0 = time.perf_counter()
                    update.update(self.critic.update(part.micro, part.values, part.returns, part.tokens))
                    timings["time/learn_critic_s"] += time.perf_counter() - t0
                for key, value in update.items():  # a skipped update's too: the log shows what was not finite
                    sums[key].append(value)
                if reason:
                    break
                updates += 1
            if reason:
                break
        tokens = float(sum(map(len, batch.response_ids)))
        measures = self._rollout_measures(parts, self._measures_kl(batch))
        stats = {key: value / max(tokens, 1.0) for key, value in measures.items()}
        stats["policy/response_tokens"] = tokens
        stats.update({k: sum(v) / len(v) if k in MEAN_STATS else v[0] for k, v in sums.items()})
        if updates:
            self.step_count += 1
            if self.regularizer.resets_reference and self.step_count % cfg.reset_every == 0:
                self.reference = self.snapshot()
                stats["policy/reference_reset"] = 1.0
        return {**stats, **timings, "policy/updates": float(updates), "skipped": float(updates == 0),
                "skip_reason": reason}

    def _minibatches(self, batch: PolicyBatch, timings: dict[str, float]) -> list[Minibatch]:
        """This rank's micro-batches of each minibatch with their old (unless the first gradient pass supplies
        them), reference and initial log-probs and advantages (GAE's from the critic)."""
        cfg, parts = self.cfg, []
        for k in range(cfg.minibatches):
            whole = shard(batch, k, cfg.minibatches)
            mine = shard(whole, self.rank, self.world)
            # (the config refuses rl.pack_tokens under rl.advantage=gae: GAE runs along each row)
            part = Minibatch(micro_batches(mine.prompt_ids, mine.response_ids, self.pad_id, cfg.micro_batch_size,
                                           cfg.pack_tokens),
                             norm=float(batch.max_new_tokens * len(whole.prompt_ids)),
                             tokens=float(sum(map(len, whole.response_ids))))
            part.engine = [_ragged(mine.engine_logprobs[mb.rows], mb) for mb in part.micro]
            with torch.no_grad():
                if not self.old_from_first_pass:
                    part.old = [self._logprobs(mb, batch.temperature, entropy=part.entropy) for mb in part.micro]
                if self.reference is not None:
                    with self.swapped_in(self.reference):
                        part.ref = [self._logprobs(mb, batch.temperature) for mb in part.micro]
                if self._measures_kl(batch):
                    if self.initial is self.reference:
                        part.initial = part.ref
                    else:  # a snapshot of its own (regularizers other than kl)
                        with self.swapped_in(self.initial):
                            part.initial = [self._logprobs(mb, batch.temperature) for mb in part.micro]
                if self.critic is not None:
                    t0 = time.perf_counter()
                    part.values = [self.critic.values(mb) for mb in part.micro]
                    timings["time/learn_critic_s"] += time.perf_counter() - t0
            if self.critic is None:
                advantages = torch.tensor(mine.advantages, dtype=torch.float32)
                part.advantages = [mb.per_token(advantages[mb.rows]) for mb in part.micro]
            else:
                scores = torch.tensor(mine.rewards, dtype=torch.float32)
                refs = part.ref or [None] * len(part.micro)
                for mb, old, ref, values in zip(part.micro, part.old, refs, part.values, strict=True):
                    rewards = token_rewards(scores[mb.rows], mb.response_mask, old, ref, cfg.kl_in_reward)
                    adv, ret = gae(rewards, values, mb.response_mask, cfg.critic.gamma, cfg.critic.lam)
                    part.advantages.append(adv)
                    part.returns.append(ret)
            parts.append(part)
        if self.critic is not None and cfg.whiten_advantages:
            self._whiten_tokens(parts)
        return parts

    def _measures_kl(self, batch: PolicyBatch) -> bool:
        return self.initial is not None and batch.measure_kl

    def _rollout_measures(self, parts: list[Minibatch], with_kl: bool) -> dict[str, float]:
        """What the rollouts' policy measures, summed over every rank's response tokens: the engine/learner
        log-prob gap, the entropy and (`with_kl`) the k3 KL to the initial policy."""
        sums = torch.zeros(3, dtype=torch.float64)  # gap, entropy, KL to the initial policy
        for part in parts:
            initial = part.initial or [None] * len(part.micro)
            for old, engine, entropy, init, mb in zip(part.old, part.engine, part.entropy, initial, part.micro,
                                                      strict=True):
                sums[0] += float(((old - engine).abs() * mb.response_mask).sum())
                sums[1] += float((entropy * mb.response_mask).sum())
                if init is not None:
                    sums[2] += float(kl_to_reference(old, init, mb.response_mask) * mb.response_mask.sum())
        (sums,) = self.sum_over_ranks([sums.to(self.params[0].device)])
        measured = {"policy/engine_logprob_gap": float(sums[0]), "policy/entropy": float(sums[1])}
        if with_kl:
            measured["policy/kl_to_initial"] = float(sums[2])
        return measured

    def _whiten_tokens(self, parts: list[Minibatch]) -> None:
        """GAE's advantages centred and scaled by the mean and std of every rank's response tokens."""
        moments = torch.zeros(3, dtype=torch.float64, device=self.params[0].device)
        for part in parts:
            for adv, mb in zip(part.advantages, part.micro, strict=True):
                m = mb.response_mask.double()
                moments += torch.stack([m.sum(), (adv.double() * m).sum(), (adv.double() ** 2 * m).sum()]).to(moments)
        (moments,) = self.sum_over_ranks([moments])
        count = float(moments[0].clamp(min=1))
        mean = float(moments[1]) / count
        std = math.sqrt(max(float(moments[2]) / count - mean**2, 0.0))
        for part in parts:
            part.advantages = [(adv - mean) / (std + 1e-8) * mb.response_mask
                               for adv, mb in zip(part.advantages, part.micro, strict=True)]

    def _update(self, part: Minibatch, temperature: float, timings: dict[str, float]) -> tuple[dict[str, float], str]:
        """One regularized optimizer step of the policy on `part`: its statistics, and why it was skipped ("" if
        it was not). Adds its times to `timings`."""
        cfg = self.cfg
        stats: dict[str, float] = {}
        calls: list[float] = []  # seconds of each full-minibatch gradient: GR's second one is its extra cost
        refs = part.ref or [None] * len(part.micro)

        def grads() -> list[Tensor]:
            """grad of the minibatch loss on every rank: accumulated over this rank's micro-batches, then summed
            over ranks; the first call (at the unperturbed weights) fills `stats`, and `part.old` if it is empty."""
            t0 = time.perf_counter()
            total = self.zeros()
            sums = torch.zeros(3, dtype=total[0].dtype, device=total[0].device)  # loss, KL, clip fraction
            fill = not part.old
            for i, (mb, ref, adv) in enumerate(zip(part.micro, refs, part.advantages, strict=True)):
                logp = self._logprobs(mb, temperature, entropy=part.entropy if fill else None)
                if fill:
                    part.old.append(logp.detach())
                old = part.old[i]
                loss, info = clipped_policy_loss(logp, old, adv, mb.response_mask, cfg.clip_eps, norm=part.norm)
                share = float(mb.response_mask.sum()) / max(part.tokens, 1.0)
                kl = torch.zeros(())
                if ref is not None:
                    kl = kl_to_reference(logp, ref, mb.response_mask)
                    if self.regularizer.uses_reference:
                        loss = loss + cfg.kl_beta * share * kl
                for acc, g in zip(total, self.gradients(loss), strict=True):
                    acc.add_(g)
                sums += torch.stack([loss.detach().float().cpu(), kl.detach().float().cpu() * share,
                                     torch.tensor(info["policy/clip_fraction"] * share)]).to(sums)
            *total, sums = self.sum_over_ranks([*total, sums])
            if "policy/loss" not in stats:
                stats.update({"policy/loss": float(sums[0]), "policy/clip_fraction": float(sums[2])})
                if self.reference is not None:
                    stats["policy/kl_to_reference"] = float(sums[1])
            calls.append(time.perf_counter() - t0)
            return total

        t_estimate = time.perf_counter()
        g, estimator_stats = self.regularizer.estimator(grads, self.params, cfg, self.perturb, self.edit)
        t_apply = time.perf_counter()
        # the split of the update: the gradient at the weights, what the regularizer's estimator adds on top
        # (GR: the perturbed second gradient, perturbation and restore), and the optimizer step
        timings["time/learn_grad_s"] += calls[0]
        timings["time/learn_regularizer_s"] += t_apply - t_estimate - calls[0]
        stats.update(estimator_stats)
        stats["policy/grad_norm"] = float(get_total_norm(g))
        reason = ("non-finite loss" if not math.isfinite(stats["policy/loss"])
                  else "non-finite gradient" if not math.isfinite(stats["policy/grad_norm"]) else "")
        if not reason:
            self.apply(g)
            timings["time/learn_step_s"] += time.perf_counter() - t_apply
        return stats, reason

    def policy_weights(self, lora_targets_only: bool = False) -> dict[str, Tensor]:
        """`policy_state_dict` of the current policy on rank 0 (empty elsewhere). Under ZeRO-3 the base weights
        are gathered for it, once, which is a collective: every rank must call this."""
        with self.whole():
            return policy_state_dict(self.model, lora_targets_only) if self.rank == 0 else {}

    def engine_weights(self) -> tuple[dict[str, Tensor], bool]:
        """The weights the engines should serve now (on rank 0; a collective, as `policy_weights`), and whether
        they are partial (LoRA targets only)."""
        lora = self.cfg.lora.enabled
        return self.policy_weights(lora_targets_only=lora), lora

    def save(self, folder: Path) -> None:
        """This rank's part of a checkpoint in `folder`: its optimizer partitions, and from rank 0 the trainable
        tensors (policy and critic), the reference snapshot and the step count."""
        self.save_engine(folder)
        if self.critic is not None:
            self.critic.save_engine(folder)
        if self.rank == 0:
            if self.reference is not None:
                save_tensors(folder / REFERENCE, self.reference)
            if self.initial is not None and self.initial is not self.reference:
                save_tensors(folder / INITIAL, self.initial)
            (folder / LEARNER_STATE).write_text(json.dumps(
                {"step": self.step_count, "world": self.world, "zero_stage": self.cfg.zero_stage}))

    def load(self, folder: Path) -> None:
        """Resume from `save`'s files."""
        state = json.loads((folder / LEARNER_STATE).read_text())
        if (state["world"], state["zero_stage"]) != (self.world, self.cfg.zero_stage):
            raise ValueError(f"{folder} holds {state['world']} ranks' ZeRO-{state['zero_stage']} state; "
                             f"this learner has {self.world} under ZeRO-{self.cfg.zero_stage}")
        self.load_engine(folder)
        if self.critic is not None:
            self.critic.load_engine(folder)
        device = self.params[0].device
        shared = self.initial is not None and self.initial is self.reference
        if self.reference is not None:
            self.reference = {k: v.to(device) for k, v in load_tensors(folder / REFERENCE).items()}
        if shared:
            self.initial = self.reference
        elif self.initial is not None and (folder / INITIAL).is_file():  # older checkpoints had none: keep the start
            self.initial = {k: v.to(device) for k, v in load_tensors(folder / INITIAL).items()}
        self.step_count = state["step"]

    def save_policy(self, folder: Path) -> Path:
        """The trained policy as a plain HF folder (LoRA merged), e.g. for evaluation or serving, written by rank
        0 (a collective, as `policy_weights`)."""
        state = self.policy_weights()
        if self.rank == 0:
            base = self.model.get_base_model() if self.cfg.lora.enabled else self.model
            base.save_pretrained(folder, state_dict=state)
            self.tokenizer.save_pretrained(folder)
        return folder
