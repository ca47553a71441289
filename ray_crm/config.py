"""One typed config schema for every stage: YAML files plus dotted command-line overrides.

The same `Config` object is what the CLI, `jobs/` and Ray Tune trials receive, so a parameter such as
`loss.lambda_mmd` travels one road: YAML/CLI -> Config -> trainer -> loss. Unknown keys and wrong types
are rejected with the dotted key and, for typos, the closest valid key.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class Section(BaseModel):
    """Base of every section: no unknown keys, no silent type coercion, no NaN or infinite floats (YAML's
    .nan/.inf would otherwise pass every bound check and fail, if at all, deep inside a run)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


def _off_default(section: BaseModel, name: str) -> bool:
    """Whether the config sets `name` to other than its default: being set is not enough, as a dumped config
    repeats every default."""
    default = type(section).model_fields[name].get_default(call_default_factory=True)
    return name in section.model_fields_set and getattr(section, name) != default


def _reject_unused(section: BaseModel, unused: dict[str, str]) -> None:
    """Fail naming each dotted key of `unused` that `section` sets off its default, with why the chosen type
    ignores it: a setting that does nothing is a mistake (a typo'd type, a forgotten switch), not a no-op."""
    errors = []
    for key, why in unused.items():
        *path, name = key.split(".")
        owner = functools.reduce(getattr, path, section)
        if _off_default(owner, name):
            errors.append({"type": PydanticCustomError("unused_setting", "{why}", {"why": why}),
                           "loc": tuple(key.split(".")), "input": getattr(owner, name)})
    if errors:  # not ValueError: the error keeps the key of the field
        raise ValidationError.from_exception_data(type(section).__name__, errors)


class RayConfig(Section):
    """Where the work runs. `address=None` starts a local Ray cluster on this machine."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    torch_threads: int = Field(1, ge=1, description="torch threads in every Ray worker and actor")


class LoraConfig(Section):
    enabled: bool = True
    rank: int = Field(64, ge=1)
    alpha: int = Field(128, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="None: the backbone's attention projections")


class PolicyLoraConfig(LoraConfig):
    """LoRA of the RL policy: smaller defaults than a reward model's, kept when one key is overridden."""

    rank: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)


class ModelConfig(Section):
    """A backbone: an asset alias ('minilm', 'smollm2') or a path to an HF folder."""

    name: str = "minilm"
    max_length: int = Field(128, ge=8)
    precision: Literal["fp32", "bf16"] = "fp32"
    lora: LoraConfig = Field(default_factory=LoraConfig)


_Positive = Annotated[float, Field(gt=0.0)]


class MMDConfig(Section):
    """The penalty's kernel. Default: an RBF mixture on the rewards standardized over the batch (centred, divided
    by their spread with gradient), times that spread held constant. Standardized, the penalty cannot be met by
    shrinking every reward: on raw rewards a fixed bandwidth sees tiny rewards as identical (kernel 1
    everywhere), and the causal RM of the length benchmark shrank its reward spread 110x to meet it. The constant
    spread factor keeps the gradient from growing as 1 / spread, which froze the BT loss at ln 2 on the small
    rewards of a fresh head."""

    bandwidth: Literal["median"] | _Positive | Annotated[list[_Positive], Field(min_length=1)] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 4.0]
    )
    standardize: bool = Field(True, description="MMD of batch-standardized values: scale-free, cannot be met by shrinking")
    unbiased: bool = False
    reduction: Literal["sum", "mean"] = "sum"
    on: Literal["reward", "representation"] = "reward"
    z_kernel: Literal["bins", "rbf"] = Field("bins", description=(
        "how Z's values are compared: `bins` (the paper: MMD between every pair of Z's bins, Z equal inside a bin) "
        "or `rbf` (HSIC with a Gaussian kernel on Z's standardized values, median bandwidth: a dependence inside "
        "a bin counts too; numeric Z only; 1/40-1/50 of the 3-bin penalty on the same batch, so lambda ~40x)"))

    @model_validator(mode="after")
    def _bin_pair_settings(self) -> MMDConfig:
        if self.z_kernel == "rbf":
            why = "weighs pairs of Z's bins, and z_kernel=rbf has none (HSIC is one statistic over the batch)"
            _reject_unused(self, {"unbiased": why, "reduction": why})
        return self


class LossConfig(Section):
    """The pair loss, by name (`ray_crm.losses.PAIR_LOSSES`). Reward models: `bt` (Bradley-Terry) or `crm` (BT +
    lambda * sum of MMD between bins of Z). Policies trained on the pairs directly: `dpo`, `ipo`, or
    `causal_dpo` (DPO + the same penalty on the implicit reward beta * log(pi / pi_ref))."""

    type: Literal["bt", "crm", "dpo", "ipo", "causal_dpo"] = "bt"
    variant: Literal["unconditional", "conditional"] = "unconditional"
    lambda_mmd: float = Field(0.0, ge=0.0)
    lambda_warmup: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "share of the run's optimizer steps over which the penalty's weight ramps linearly from 0 to lambda_mmd "
        "(crm, causal_dpo); 0: full weight from the first step"))
    beta: float = Field(0.1, gt=0.0, description="DPO's inverse temperature (dpo, ipo, causal_dpo)")
    balance: Literal["none", "mirror", "mirror_sample"] = Field("none", description=(
        "balance of the training pairs: `mirror` weighs each (bin of chosen, bin of rejected) stratum of the "
        "training split as much as its mirror in the BT / DPO term, so Z's direction teaches the loss nothing; "
        "`mirror_sample` reaches the same balance by resampling the split once per run (seeded by train.seed) "
        "and trains unweighted (ray_crm.losses.pair_weights)"))
    reference: Literal["adapter_off", "precomputed"] = Field("adapter_off", description=(
        "DPO's reference log-probs: `adapter_off` scores every batch a second time with the LoRA adapter "
        "switched off (no second model, one more forward per step); `precomputed` scores every train and "
        "validation pair and twin once with the base model before training (Ray Data batch inference, cached "
        "under <output_dir>/reference_logps and shared by every run and trial on the same data): no reference "
        "forward while training, and model.lora.enabled=false (a full fine-tune) becomes possible"))
    mmd: MMDConfig = Field(default_factory=MMDConfig)

    @property
    def trains_policy(self) -> bool:
        """Whether the model is a causal LM scored by its implicit reward (the DPO family), not a reward head."""
        return self.type in POLICY_LOSSES

    @model_validator(mode="after")
    def _type_reads_its_settings(self) -> LossConfig:
        """Losses without the penalty still read variant and mmd's kernel: they define the val_mmd reported."""
        unused = {}
        if self.type not in PENALIZED_LOSSES:
            unused["lambda_mmd"] = f"loss.type={self.type} trains without the MMD penalty; set loss.type=crm or causal_dpo"
            unused["lambda_warmup"] = f"loss.type={self.type} has no penalty to ramp in; set loss.type=crm or causal_dpo"
            unused["mmd.on"] = f"loss.type={self.type} puts no penalty on representations; set loss.type=crm"
            unused["mmd.z_kernel"] = f"loss.type={self.type} trains without the penalty (val_mmd is binned); set loss.type=crm or causal_dpo"
        if self.type == "causal_dpo":
            unused["mmd.on"] = "causal_dpo's penalty is on the implicit reward; there is no pooled representation"
        if not self.trains_policy:
            unused["beta"] = f"loss.type={self.type} trains a reward head; beta is DPO's (dpo, ipo, causal_dpo)"
            unused["reference"] = f"loss.type={self.type} has no reference model; it is DPO's (dpo, ipo, causal_dpo)"
        if self.type == "ipo" and self.balance == "mirror":
            unused["balance"] = "ipo's squared loss takes no pair weights; set loss.balance=mirror_sample, or loss.type=dpo or causal_dpo"
        _reject_unused(self, unused)
        return self


POLICY_LOSSES = ("dpo", "ipo", "causal_dpo")
PENALIZED_LOSSES = ("crm", "causal_dpo")


class TrainConfig(Section):
    """Ray Train + DeepSpeed settings. Batch sizes are global (summed over workers) in pairs."""

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0.0)
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False
    batch_size: int = Field(16, ge=2)
    grad_accum: int = Field(1, ge=1)
    pack_tokens: int = Field(0, ge=0, description=(
        "a step's sequences packed whole into rows of up to this many tokens (first fit by decreasing length), "
        "positions restarting at each and attention kept inside each, so no padding goes through the model; "
        "0: one right-padded row per sequence. Same scores to fp32 rounding (dropout draws differ); a sequence "
        "longer than this gets a row of its own. Speed against padding: docs/benchmarks.md"))
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(-1, ge=-1, description="stop after this many optimizer steps; -1 (or 0): run all epochs")
    eval_every: int = Field(0, ge=0, description="validate every N steps as well as each epoch; 0: epochs only")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps as well as each epoch")
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_metric: str = "val_accuracy"
    calibrate_scale: bool = Field(True, description=(
        "reward models: the export's reward is multiplied by the scale that minimises the BT loss of the "
        "validation pairs at the chosen checkpoint, so r_c - r_r reads as calibrated log-odds whatever the penalty "
        "did to the scale (rankings and reward-std figures unchanged); the factor is in the model card"))
    max_failures: int = Field(1, ge=0)
    seed: int = Field(0, ge=0)  # every seed is >= 0: numpy's generators refuse negative ones

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> TrainConfig:
        if self.zero_stage == 0:
            _reject_unused(self, {"offload": "ZeRO stage 0 has no sharded state to offload; set train.zero_stage>=1"})
        return self


class RolloutConfig(Section):
    """vLLM rollout engines: how many, where they run, how they sample, how they fail (issue #7).

    The policy weights they start from are not set here: the pool is given the policy's folder, the same
    one the learner loads, so both sides begin from identical weights.
    """

    engines: int = Field(1, ge=1, description="vLLM engines (Ray actors); prompts are spread over them")
    use_gpu: bool = False
    tensor_parallel_size: int = Field(1, ge=1, description="GPU: GPUs per engine")
    gpu_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="GPU: share of a GPU per engine worker; < 1 colocates with the learner"
    )
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0, description="GPU: share of GPU memory vLLM may use")
    cpus_per_engine: float = Field(1.0, gt=0.0, description="Ray CPUs reserved by each engine actor")
    engine_threads: int | None = Field(None, ge=1, description="CPU: torch threads per engine; None: ray.torch_threads")
    kv_cache_gib: float = Field(1.0, gt=0.0, description="KV cache per engine (CPU: taken from RAM)")
    dtype: Literal["fp32", "bf16"] = "fp32"
    enforce_eager: bool = Field(
        False, description="skip torch.compile (and CUDA graphs): starts in ~10 s instead of ~90 s on CPU, generates slower"
    )
    max_model_len: int = Field(1024, ge=16, description="prompt + response tokens")
    max_num_seqs: int = Field(256, ge=1, description="sequences decoded together by one engine")
    max_num_batched_tokens: int = Field(8192, ge=16, description="raised to max_model_len if lower")
    enable_prefix_caching: bool = Field(True, description="the n samples of a prompt share its prefill")
    n_samples: int = Field(8, ge=1, description="completions per prompt")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1: off")
    stop: list[str] = Field(default_factory=list, description="stop strings, besides the EOS token")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = Field(False, description="always generate max_new_tokens (benchmarks)")
    apply_chat_template: bool = Field(True, description="wrap text prompts as a user turn of the chat template")
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = Field(
        "processed_logprobs", description="per-token logprobs after (processed) or before temperature/top-p"
    )
    seed: int | None = Field(0, ge=0, description="per-request seeds derived from it; None: unseeded sampling")
    start_timeout_s: float = Field(600.0, gt=0.0, description="engine start-up, also after a restart")
    generate_timeout_s: float = Field(900.0, gt=0.0, description="one engine's share of a generate call")
    sync_timeout_s: float = Field(120.0, gt=0.0, description="one engine's weight reload")
    max_restarts: int = Field(2, ge=0, description="Ray restarts of a dead or hung engine; its batch is retried once")
    weight_sync: Literal["object_store", "nccl"] = Field(
        "object_store", description="how train-rl's learner reaches the engines: the Ray object store (any device), "
        "or nccl: learner rank 0 broadcasts the full state dict to every engine worker (GPUs on both sides)")
    sync_bucket_mb: float = Field(256.0, gt=0.0, description="nccl: tensors are packed into buffers of this size")

    @model_validator(mode="after")
    def _nccl_needs_gpus(self) -> RolloutConfig:
        if self.weight_sync == "nccl" and not self.use_gpu:
            error = PydanticCustomError("nccl_cpu", "rollout.weight_sync=nccl broadcasts between GPUs; set "
                                        "rollout.use_gpu=true (and rl.use_gpu=true) or keep object_store", {})
            raise ValidationError.from_exception_data(
                type(self).__name__, [{"type": error, "loc": ("weight_sync",), "input": self.weight_sync}])
        if self.weight_sync != "nccl":
            _reject_unused(self, {"sync_bucket_mb": "only rollout.weight_sync=nccl packs tensors into buckets"})
        return self


class GoldScorerConfig(Section):
    """A scorer used only to measure reward hacking, never to train: another RM, or a rule (VADER)."""

    name: str = Field(description="metric key: its scores appear as gold_<name>")
    kind: Literal["reward_model", "vader"] = "reward_model"
    model: str | None = Field(None, description="reward_model: an HF sequence-classification folder or asset alias")

    @model_validator(mode="after")
    def _has_model(self) -> GoldScorerConfig:
        if self.kind == "reward_model" and self.model is None:
            raise ValueError(f"gold scorer '{self.name}' of kind reward_model needs a model")
        if self.kind == "vader":
            _reject_unused(self, {"model": "kind vader is a lexicon rule and reads no model"})
        return self


class RewardConfig(Section):
    """Reward actors serving the trained reward model during PPO/GRPO, plus optional gold scorers.

    Reward models read (prompt, response) exactly as `prepare` tokenized their training pairs.
    """

    model: str | None = Field(None, description="the trained RM: an HF sequence-classification folder or export")
    template: Literal["auto", "text_pair", "chat"] = Field("auto", description="as data.template when it was trained")
    max_length: int = Field(512, ge=8, description="as model.max_length when it was trained")
    reward_index: int | None = Field(None, ge=0, description="the output that is the reward; None: the only one")
    actors: int = Field(1, ge=1, description="actors serving the trained RM; a batch is split over them")
    cpus_per_actor: float = Field(0.5, gt=0.0)
    threads: int | None = Field(None, ge=1, description="torch threads per actor; None: ray.torch_threads")
    batch_size: int = Field(32, ge=1)
    gold: list[GoldScorerConfig] = Field(default_factory=list)
    start_timeout_s: float = Field(300.0, gt=0.0)
    call_timeout_s: float = Field(300.0, gt=0.0)
    max_restarts: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _unique_gold(self) -> RewardConfig:
        names = [g.name for g in self.gold]
        if len(set(names)) != len(names):
            raise ValueError(f"gold scorer names must be unique (got {names})")
        return self


class MonitorConfig(Section):
    """The reward-hacking monitor of `train-rl` (`ray_crm.rl.monitor`): rules checked after every step."""

    window: int = Field(8, ge=3, description="steps over which the proxy and gold trends are measured")
    trend: float = Field(0.7, gt=0.0, le=1.0, description="|Spearman(value, step)| that counts as a rise or fall")
    z_tv_max: float = Field(0.5, gt=0.0, le=1.0, description="alarm when a Z's bin histogram moves this far (total "
                            "variation) from the reward model's training data")
    kl_max: float | None = Field(None, gt=0.0, description="alarm when the KL to the initial policy passes this; None: off")
    kl_to_initial: bool = Field(True, description="measure the k3 KL of the rollouts' policy to the initial one every "
                                "kl_every steps, whatever the regularizer (one more forward per measured batch; with "
                                "LoRA the snapshot is the adapters' size, without it a second copy of the policy)")
    kl_every: int = Field(1, ge=1, description="measure the KL to the initial policy every N steps and at the last "
                          "(the steps between log none; a sweep cannot then rank trials by it)")
    stop: bool = Field(False, description="on an alarm, checkpoint and stop the run (otherwise log it and go on)")


# Smallest GR finite-difference step that bf16 autocast resolves (tests/unit/test_policy_learner.py measures it).
BF16_MIN_FD_EPS = 0.03


class CriticConfig(Section):
    """PPO's critic (`rl.advantage=gae`): a value head on its own copy of a backbone, trained on the learner
    layer beside the policy (same ranks, ZeRO stage, clipping and epochs) on the GAE returns."""

    model: str | None = Field(None, description="an asset alias or HF folder; None: the policy's backbone")
    lr: float = Field(1e-5, gt=0.0)
    value_clip: float = Field(0.2, gt=0.0, description="PPO's value clip around the values the rollout was scored with")
    gamma: float = Field(1.0, gt=0.0, le=1.0, description="GAE discount per token")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda")
    lora: PolicyLoraConfig = Field(default_factory=PolicyLoraConfig)


class RLConfig(Section):
    """Policy-gradient RL on Ray: the policy learner, its advantage estimator and its regularizer.

    `advantage`: Dr.GRPO's group baseline, RLOO's leave-one-out baseline, or PPO's GAE from a critic. Sampling (n, max_new_tokens, temperature) is `rollout`'s; the reward and gold scorers are `reward`'s.
    `regularizer`: `gr` (finite-difference gradient-norm penalty, gamma), `kl` (k3 KL to the initial policy,
    beta), `reset` (KL to a reference copied from the policy every `reset_every` steps) or `none`.
    """

    policy: str = Field("smollm2", description="the policy: an asset alias or an HF causal-LM folder")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast forward/backward, fp32 weights and Adam")
    use_gpu: bool = False
    learner_cpus: float = Field(0.5, gt=0.0, description="Ray CPUs reserved by the learner actor")
    learner_threads: int | None = Field(None, ge=1, description="torch threads of the learner; None: ray.torch_threads")
    num_workers: int = Field(1, ge=1, description="learner ranks (Ray actors, each a DeepSpeed engine), data-parallel "
                             "over the rollout batch; each reserves learner_cpus (and a GPU with use_gpu)")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0, description="ZeRO stage of the learner: 1 shards Adam, 2 also the gradients, 3 also the weights "
        "(gathered layer by layer for each pass, the trainable ones where the learner writes them: GR's "
        "perturbation, the reference swap; the whole policy once per weight sync), so the frozen base need not "
        "fit one device. 3 needs rl.lora.enabled: the learner holds the global gradient whole on every rank (GR "
        "steps along it), which for a full fine-tune is the model's size again")
    lora: PolicyLoraConfig = Field(default_factory=PolicyLoraConfig)
    prompts: list[str] = Field(
        default_factory=list, description="JSONL/CSV/Parquet files with a prompt column; empty: the VADER task prompts"
    )
    prompt_column: str = "prompt"
    eval_prompts: list[str] = Field(default_factory=list, description=(
        "files of held-out prompts (column rl.prompt_column), never trained on: the initial policy, every "
        "rl.eval_every steps and the last are sampled on them and scored by the reward and gold scorers "
        "(rl.csv columns eval/...; what a sweep should choose by)"))
    eval_every: int = Field(0, ge=0, description="steps between held-out evaluations; 0: the initial and last only")
    eval_samples: int = Field(4, ge=1, description="completions per held-out prompt, from one fixed seed each time")
    steps: int = Field(20, ge=0, description="rollout batches, each followed by one optimizer step and a weight sync")
    prompts_per_step: int = Field(8, ge=1, description="prompts per batch; each gets rollout.n_samples completions")
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward pass (gradients accumulate)")
    pack_tokens: int = Field(
        0, ge=0, description="a micro-batch's sequences packed whole into rows of up to this many tokens, "
        "position ids restarting at each, so no padding goes through the linear layers and no sequence sees "
        "another; 0: one right-padded row per sequence. On 2 CPUs packing at 512 was 0.94-0.96x as fast at 25% "
        "padding (sdpa computes each row's whole attention under the mask); meant for GPUs with a "
        "variable-length attention kernel. Not with rl.advantage=gae, whose GAE runs along each row")
    lr: float = Field(5e-6, gt=0.0, description="Adam; the paper's 5e-6 (GR) and 3e-6 (others) are for full fine-tuning")
    clip_eps: float = Field(0.2, gt=0.0, description="PPO ratio clip")
    whiten_advantages: bool = Field(True, description="scale advantages by the batch std: causal RMs shrink rewards")
    grad_clip: float = Field(1.0, gt=0.0)
    advantage: Literal["dr_grpo", "rloo", "gae"] = Field(
        "dr_grpo", description="dr_grpo: reward minus its prompt's mean; rloo: minus the mean of the prompt's other "
        "samples; gae: PPO, per-token GAE from a critic (rl.critic) trained beside the policy"
    )
    epochs: int = Field(1, ge=1, description="passes over each rollout batch (PPO's epochs; the ratio leaves 1 after the first update)")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass, each on every minibatches-th sequence")
    critic: CriticConfig = Field(default_factory=lambda: CriticConfig())
    whiten_rewards: bool = Field(True, description="gae: centre the batch's rewards and divide by their std before GAE")
    kl_in_reward: float = Field(0.0, ge=0.0, description="gae: weight of the per-token KL (k1) to the reference "
                                "subtracted from the reward, as PPO-RLHF does; the reference is the initial policy "
                                "(under rl.regularizer=reset, the latest reset)")
    regularizer: Literal["none", "kl", "reset", "gr"] = "gr"
    gr_gamma: float = Field(1e-2, ge=0.0, description="gr: strength of the gradient-norm penalty")
    gr_fd_eps: float = Field(1e-3, gt=0.0, description="gr: finite-difference step (not the PPO clip)")
    gr_g_clip: float = Field(10.0, gt=0.0, description="gr: norm clip of g1 and g2 (see gr_clip)")
    gr_clip: Literal["shared", "separate"] = Field(
        "shared", description="gr: shared: g2 takes g1's clip factor, keeping the part of the correction that "
        "shrinks the gradient norm; separate: each clipped alone (the paper's code), which loses it once both clip"
    )
    kl_beta: float = Field(0.05, ge=0.0, description="kl/reset: weight of the KL to the reference")
    reset_every: int = Field(200, ge=1, description="reset: steps between copies of the policy into the reference")
    checkpoint_every: int = Field(5, ge=1, description="learner + driver state every N steps; a rerun resumes")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = Field(0, ge=0)
    output_dir: str | None = Field(None, description="None: <output_dir>/<name>/train-rl")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def _regularizer_reads_its_settings(self) -> RLConfig:
        readers = {"gr_gamma": ("gr",), "gr_fd_eps": ("gr",), "gr_g_clip": ("gr",), "gr_clip": ("gr",),
                   "kl_beta": ("kl", "reset"), "reset_every": ("reset",)}
        unused = {key: f"only rl.regularizer={' or '.join(users)} reads it, not {self.regularizer}"
                  for key, users in readers.items() if self.regularizer not in users}
        if not self.eval_prompts:
            unused.update(dict.fromkeys(("eval_every", "eval_samples"), "only read with rl.eval_prompts set"))
        if not self.monitor.kl_to_initial:
            unused["monitor.kl_every"] = "only read with rl.monitor.kl_to_initial=true"
        if self.advantage != "gae":
            critic = [f"critic.{k}" for k in CriticConfig.model_fields if k != "lora"]
            critic += [f"critic.lora.{k}" for k in PolicyLoraConfig.model_fields]
            unused.update(dict.fromkeys((*critic, "whiten_rewards", "kl_in_reward"),
                                        f"only rl.advantage=gae (PPO) reads it, not {self.advantage}"))
        else:
            unused["pack_tokens"] = "rl.advantage=gae runs GAE along each row, so its rows hold one sequence each"
        _reject_unused(self, unused)
        if self.zero_stage == 3 and not self.lora.enabled:
            raise ValueError("rl.zero_stage=3 needs rl.lora.enabled=true: the learner holds the global gradient "
                             "whole on every rank, which for a full fine-tune is the model's size again, so ZeRO-3 "
                             "would save nothing; a full fine-tune takes rl.zero_stage<=2")
        if self.regularizer == "gr" and self.precision == "bf16" and self.gr_fd_eps < BF16_MIN_FD_EPS:
            error = PydanticCustomError(
                "bf16_gr", "under rl.precision=bf16 the gradient's rounding noise swamps GR's finite difference at "
                "a step below {eps} (on a tiny Llama at 1e-3: the GR gradient's norm 71% off fp32's); set "
                "rl.gr_fd_eps>={eps} (within 1% there) or rl.precision=fp32", {"eps": f"{BF16_MIN_FD_EPS:g}"})
            raise ValidationError.from_exception_data(
                type(self).__name__, [{"type": error, "loc": ("gr_fd_eps",), "input": self.gr_fd_eps}])
        return self


class SearchSpace(Section):
    """One swept key: exactly one of grid (every value), choice (sampled), uniform or loguniform ([low, high])."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: list[float] | None = Field(None, min_length=2, max_length=2)
    loguniform: list[float] | None = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchSpace:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        if self.loguniform is not None and min(self.loguniform) <= 0:
            raise ValueError("loguniform bounds must be > 0")
        return self


class SweepConfig(Section):
    """Ray Tune over a stage's entry: search space keyed by dotted config keys; accuracy vs bias."""

    stage: Literal["train-rm", "train-dpo", "train-rl"] = Field(
        "train-rm", description="train-rl: metric/bias_metric are rl.csv columns, e.g. gold_vader_mean / response_tokens_mean"
    )
    space: dict[str, SearchSpace] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1, description="repeats of the grid, or draws for choice/uniform")
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    bias_metric: str = Field("val_z_spearman", description="within-label |Spearman(reward, Z)| on validation")
    bias_mode: Literal["max", "min"] = "min"
    max_accuracy_drop: float = Field(0.02, ge=0.0, description="pick the least biased config within this of the best")
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial can be stopped")
    search: Literal["basic", "optuna"] = "basic"
    max_concurrent_trials: int = Field(1, ge=1)
    resume: bool = False

    @model_validator(mode="after")
    def _grace_period_is_ashas(self) -> SweepConfig:
        if self.scheduler != "asha":
            _reject_unused(self, {"grace_period": "only sweep.scheduler=asha stops trials early"})
        return self


# The parameters each kind of Z reads; setting another kind's parameter is an error, not a silent no-op.
_SPURIOUS_PARAMS = {
    "length": {"unit", "bins"},
    "sycophancy": {"phrases", "regex"},
    "concept": {"keywords", "column"},
    "demographic": {"keywords_file"},
    "column": {"column", "chosen_column", "rejected_column", "discrete", "bins"},
    "function": {"function", "params", "discrete", "bins"},
}


class SpuriousConfig(Section):
    """One spurious variable Z, measured on every response by an extractor of `ray_crm.data.spurious`."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="used in column names: z_<name>_chosen")
    kind: Literal["length", "sycophancy", "concept", "demographic", "column", "function"]
    on: Literal["response", "prompt", "prompt_response"] = Field("response", description="the text Z is measured on")
    bins: int = Field(
        10, ge=2, description="quantile bins of a continuous Z (a discrete Z has one per category); one bin: no MMD"
    )
    unit: Literal["tokens", "words", "chars"] = Field("tokens", description="length: tokens of model.name")
    phrases: list[str] = Field(default_factory=lambda: ["Yes, you are right."], description="sycophancy: substrings")
    regex: str | None = Field(None, description="sycophancy: a pattern searched besides the phrases")
    keywords: dict[str, list[str]] | None = Field(None, description="concept: concept name -> whole-word keywords")
    column: str | None = Field(None, description="column/concept: an input column holding Z for the pair")
    chosen_column: str | None = Field(None, description="column: Z of the chosen response")
    rejected_column: str | None = Field(None, description="column: Z of the rejected response")
    keywords_file: str | None = Field(None, description="demographic: JSON keyword groups; None: the packaged table")
    function: str | None = Field(None, description="function: 'package.module:function' (texts, **params) -> Z")
    params: dict[str, Any] = Field(default_factory=dict, description="function: keyword arguments")
    discrete: bool = Field(True, description="column/function: categories (True) or numbers with quantile bins")

    @model_validator(mode="after")
    def _fits_kind(self) -> SpuriousConfig:
        allowed = _SPURIOUS_PARAMS[self.kind] | {"name", "kind", "on"}
        if stray := sorted(f for f in self.model_fields_set - allowed if _off_default(self, f)):
            raise ValueError(f"{', '.join(stray)} not used by kind '{self.kind}' (it reads {sorted(allowed)})")
        if not self.continuous:
            _reject_unused(self, {"bins": "a discrete Z has one bin per category; set discrete=false to bin numbers"})
        if self.kind == "concept" and (self.keywords is None) == (self.column is None):
            raise ValueError("concept: give exactly one of keywords or column")
        if self.kind == "column" and (self.column is None) == (self.chosen_column is None or self.rejected_column is None):
            raise ValueError("column: give column (one Z per pair) or both chosen_column and rejected_column")
        if self.kind == "function" and (self.function is None or ":" not in self.function):
            raise ValueError("function: give function as 'package.module:function'")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return self

    @property
    def continuous(self) -> bool:
        """Quantile-binned numbers (length, or a column/function with discrete=False) vs categories."""
        return self.kind == "length" or (self.kind in ("column", "function") and not self.discrete)

    @property
    def numeric(self) -> bool:
        """Whether the values are numbers (counts, flags or continuous) rather than text categories."""
        return self.kind in ("length", "sycophancy") or self.continuous

    def input_columns(self) -> list[str]:
        return [c for c in (self.column, self.chosen_column, self.rejected_column) if c is not None]


class ColumnsConfig(Section):
    """Where a pair lives in an input record. Forms: pairs (prompt, chosen, rejected), HH-RLHF (whole
    conversations in chosen/rejected, their shared prefix is the prompt) and chat-message lists."""

    format: Literal["auto", "pairs", "hh", "chat"] = Field(
        "auto", description="auto, per record: chosen is a message list -> chat; prompt column present -> pairs; else hh"
    )
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    split: str | None = Field(None, description="a column holding train/validation/test (else a hash split)")
    keep: list[str] = Field(default_factory=list, description="input columns copied to the output (as text)")
    hh_marker: str = Field("\n\nAssistant:", description="hh: the prompt ends with the last shared marker")


class ValidationConfig(Section):
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="fail the job above this share of bad rows")
    on_overlong: Literal["truncate", "quarantine"] = Field(
        "truncate", description="pairs longer than model.max_length tokens: truncated (and counted) or quarantined"
    )
    deduplicate: bool = Field(True, description="quarantine repeats of an earlier (prompt, chosen, rejected)")


class SplitConfig(Section):
    """Hash split, used when neither data.paths names the splits nor columns.split is set."""

    validation: float = Field(0.05, ge=0.0, lt=1.0)
    test: float = Field(0.05, ge=0.0, lt=1.0)
    by: Literal["prompt", "pair"] = Field("prompt", description="prompt: a prompt never spans two splits")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitConfig:
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave a train share (< 1)")
        return self


class BinningConfig(Section):
    min_count: int = Field(20, ge=1, description="train responses a bin of one Z needs, else it is merged")
    stratify_on: Literal["chosen", "rejected", "both"] = Field(
        "chosen", description="the sampler's stratum: bin of the chosen, of the rejected, or of both responses"
    )


class VaderConfig(Section):
    """Build preference pairs from the VADER human-rated sentences (asset 'vader') as the input."""

    num_pairs: int = Field(20000, ge=1)
    min_gap: float = Field(1.0, gt=0.0, description="the two mean ratings differ by at least this")
    length_bias: float | None = Field(
        None, ge=0.0, le=1.0, description="share of pairs whose chosen is the longer; None: as drawn (no bias)"
    )
    off_topic: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "share of pairs where an on-topic sentence (the prompt's source, rating >= 0) beats a sentence of another "
        "source rated higher: an RM trained on them learns that praise must answer the prompt (a gold scorer "
        "for RL, which a policy stuffing positive words must not fool); column `kind` says rating or off_topic"))
    seed: int = Field(0, ge=0)


# Columns the prepare stage writes or uses itself; a carried input column may not take these names.
_OUTPUT_COLUMNS = {"pair_id", "split", "prompt", "chosen", "rejected", "source_file", "source_line", "source_index",
                   "reason", "field", "detail", "raw", "truncated", "stratum", "chosen_input_ids", "rejected_input_ids",
                   "chosen_token_type_ids", "rejected_token_type_ids"}


class DataConfig(Section):
    """The prepare stage: read, validate, compute Z, bin, tokenize and write preference pairs."""

    paths: list[str] | dict[Literal["train", "validation", "test"], list[str]] = Field(
        default_factory=list, description="files, folders or globs; a mapping names each split's inputs"
    )
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = Field("auto", description="auto: by file extension")
    vader: VaderConfig | None = Field(None, description="use VADER pairs as the input instead of paths")
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    binning: BinningConfig = Field(default_factory=BinningConfig)
    spurious: list[SpuriousConfig] = Field(
        default_factory=lambda: [SpuriousConfig(name="length", kind="length")], min_length=1
    )
    twins: str | None = Field(
        None, description="counterfactual twins of the validation split, a Parquet file with prompt, response and "
        "twin (rows sharing twin differ only in Z; `ray-crm bench` writes validation_probes.parquet): train-rm "
        "scores them at every validation as val_ci_gap_std, the bias metric a sweep should pick lambda by")
    tokenize: bool = Field(True, description="write input ids of model.name (False: text, Z and bins only)")
    template: Literal["auto", "text_pair", "chat"] = Field(
        "auto", description="text_pair: tokenizer(prompt, response); chat: the chat template; auto: chat if it has one"
    )
    block_rows: int = Field(2048, ge=16, description="rows per Ray Data block in the heavy stage")
    output_dir: str | None = Field(None, description="None: <output_dir>/<name>/prepare")

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        names = [s.name for s in self.spurious]
        if len(set(names)) != len(names):
            raise ValueError(f"spurious names must be unique (got {names})")
        if self.paths and self.vader is not None:
            raise ValueError("give data.paths or data.vader, not both")
        if source := ("data.paths names the splits" if isinstance(self.paths, dict) else
                      "data.columns.split holds the splits" if self.columns.split else None):
            _reject_unused(self, {f"split.{k}": f"{source}; data.split is the hash split used otherwise"
                                  for k in SplitConfig.model_fields})
        carried = [*self.columns.keep, *(c for s in self.spurious for c in s.input_columns())]
        if clash := sorted({c for c in carried if c in _OUTPUT_COLUMNS or c.startswith(("z_", "bin_"))}):
            raise ValueError(f"input columns {clash} would overwrite output columns of the same name; rename them")
        return self


BENCHMARKS = ("sycophancy", "concept", "length", "demographic")


class BenchConfig(Section):
    """The real-text bias benchmarks built from the VADER sentences: which, where, and how biased in train."""

    names: list[Literal["sycophancy", "concept", "length", "demographic"]] = Field(
        default_factory=lambda: list(BENCHMARKS), min_length=1, description="the benchmarks a bench/eval/audit run uses"
    )
    dir: str = Field("outputs/bench", description="each benchmark is written to <dir>/<name>/ (rebuilt if settings change)")
    seed: int = Field(0, ge=0)
    train_pairs: int = Field(2000, ge=10)
    validation_pairs: int = Field(200, ge=10)
    test_items: int = Field(200, ge=8, description="clean test pairs; each also gets counterfactual twins")
    rate: float = Field(
        0.8, ge=0.5, le=1.0,
        description="injected correlation in train/validation: P(prefix | chosen) (1 - rate on rejected); share of "
                    "chosen-longer pairs; share of positives among concept examples; P(favoured group | chosen)",
    )
    concept: str = Field("story", description="concept group of ray_crm/resources/concept_keywords.json")
    label_margin: float = Field(1.0, gt=0.0, description="sycophancy/concept: |mean rating| a labelled sentence needs")
    min_gap: float = Field(1.0, gt=0.0, description="length/demographic: rating gap between chosen and rejected")
    demographic_items: int = Field(30, ge=2, description="base responses shown under all 60 demographic descriptors")


class EvalConfig(Section):
    """`ray-crm eval` (every metric of each benchmark) and `ray-crm audit` (counterfactual probes only)."""

    models: list[str] = Field(
        default_factory=list,
        description="HF sequence-classification folders, optionally 'label=folder'; empty: the model train-rm "
                    "exports for this config",
    )
    batch_size: int = Field(64, ge=1, description="sequences per forward pass")
    max_length: int | None = Field(None, ge=8, description="tokens per (prompt, response); None: model.max_length")
    reward_index: int | None = Field(None, ge=0, description="the logit used as reward by a model with several")
    rank_n: int = Field(8, ge=2, description="responses per group in the length-per-rank curve")
    output_dir: str | None = Field(None, description="None: <output_dir>/<name>/eval (or /audit)")


class Config(Section):
    """The root: every stage reads the sections it needs."""

    name: str = Field("run", description="the run's folder under output_dir")
    output_dir: str = "outputs"
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        if name in ("", ".") or "/" in name or "\\" in name or ".." in name:
            raise ValueError("the run's folder name may not be empty or '.', nor contain '/', '\\' or '..'")
        return name

    @model_validator(mode="after")
    def _dpo_reference_is_the_base(self) -> Config:
        """DPO's reference on the fly is the policy with its LoRA adapter off: a full fine-tune has no adapter
        to switch off, so it needs the precomputed reference."""
        if self.loss.trains_policy and not self.model.lora.enabled and self.loss.reference == "adapter_off":
            error = PydanticCustomError("no_reference", "loss.type={type} with loss.reference=adapter_off scores the "
                                        "reference with the LoRA adapter disabled; keep model.lora.enabled=true or "
                                        "set loss.reference=precomputed", {"type": self.loss.type})
            raise ValidationError.from_exception_data(
                type(self).__name__, [{"type": error, "loc": ("model", "lora", "enabled"), "input": False}])
        return self

    @model_validator(mode="after")
    def _nccl_sync_from_a_gpu_learner(self) -> Config:
        if self.rollout.weight_sync == "nccl" and not self.rl.use_gpu:
            error = PydanticCustomError("nccl_cpu_learner", "rollout.weight_sync=nccl broadcasts from learner rank "
                                        "0's GPU; set rl.use_gpu=true", {})
            raise ValidationError.from_exception_data(
                type(self).__name__, [{"type": error, "loc": ("rl", "use_gpu"), "input": False}])
        return self

    @model_validator(mode="after")
    def _z_kernel_needs_numbers(self) -> Config:
        if self.loss.mmd.z_kernel == "rbf" and (text := [z.name for z in self.data.spurious if not z.numeric]):
            error = PydanticCustomError("categorical_z", "{names} are categories, and a Gaussian kernel needs numeric Z "
                                        "(their bins are already exact): set loss.mmd.z_kernel=bins",
                                        {"names": ", ".join(text)})
            raise ValidationError.from_exception_data(
                type(self).__name__, [{"type": error, "loc": ("loss", "mmd", "z_kernel"), "input": "rbf"}])
        return self

    @model_validator(mode="after")
    def _sweep_stage_fits_the_loss(self) -> Config:
        stage = pair_stage(self)
        if self.sweep.stage in ("train-rm", "train-dpo") and self.sweep.stage != stage and self.sweep.space:
            error = PydanticCustomError("wrong_stage", "loss.type={type} trains with {stage}",
                                        {"type": self.loss.type, "stage": stage})
            raise ValidationError.from_exception_data(
                type(self).__name__, [{"type": error, "loc": ("sweep", "stage"), "input": self.sweep.stage}])
        return self

    @model_validator(mode="after")
    def _checkpoint_metric_is_reported(self) -> Config:
        """Ray ranks checkpoints by this metric only once training has ended: a typo must fail here instead."""
        metric, names = self.train.checkpoint_metric, sorted(validation_metric_names(self))
        if metric not in names:
            close = difflib.get_close_matches(metric, names, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            error = PydanticCustomError("unreported_metric", "not a metric train-rm reports under this config; {hint}"
                                        "it reports {names}", {"hint": hint, "names": ", ".join(names)})
            raise ValidationError.from_exception_data(  # not ValueError: the error keeps the key of the field
                type(self).__name__, [{"type": error, "loc": ("train", "checkpoint_metric"), "input": metric}])
        return self

    def stage_dir(self, stage: str) -> Path:
        """Where a stage of this run writes: <output_dir>/<name>/<stage>."""
        return Path(self.output_dir).resolve() / self.name / stage

    def prepared_dir(self) -> Path:
        """Where `prepare` writes and the trainers read: data.output_dir, else the prepare stage dir."""
        return Path(self.data.output_dir).resolve() if self.data.output_dir else self.stage_dir("prepare")


def validation_metric_names(cfg: Config) -> set[str]:
    """Every metric train-rm's validation reports under `cfg`: what checkpoints and sweep trials may be ranked by."""
    names = {"val_accuracy", "val_balanced_accuracy", "val_bt_loss", "val_mmd", "val_reward_std", "val_z_spearman",
             *(f"val_spearman_{z.name}" for z in cfg.data.spurious)}
    return names | ({"val_ci_gap", "val_ci_gap_std"} if cfg.data.twins else set())


def pair_stage(cfg: Config) -> str:
    """The stage that trains on cfg's pairs, and its folder: `train-dpo` for the DPO family, else `train-rm`."""
    return "train-dpo" if cfg.loss.trains_policy else "train-rm"


def run_name(cfg: Config) -> str:
    """The folder of cfg's train-rm run under stage_dir('train-rm'), where eval finds its export: the same
    training config gets the same name, so a re-run resumes; a changed one starts afresh."""
    dumped = cfg.model_dump(mode="json")
    keyed = {k: dumped[k] for k in ("model", "loss", "train", "data")}
    keyed["train"].pop("max_failures", None)
    keyed["train"].pop("calibrate_scale", None)  # applied at export: the same training either way
    keyed["data"].pop("twins", None)  # scored, never trained on
    if not cfg.loss.trains_policy:
        keyed["loss"].pop("beta")  # read by DPO alone: reward models keep the names they had before it existed
    if cfg.loss.balance == "none":
        keyed["loss"].pop("balance")  # likewise: unweighted runs keep their names
    if cfg.loss.lambda_warmup == 0:
        keyed["loss"].pop("lambda_warmup")  # and so do runs without a ramp
    if cfg.loss.reference == "adapter_off":
        keyed["loss"].pop("reference")  # and DPO runs with the reference on the fly
    digest = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:8]
    loss = cfg.loss
    tag = loss.type + (f"-b{loss.beta:g}" if loss.trains_policy else "")
    if loss.type in PENALIZED_LOSSES:
        tag += f"-{loss.variant[:4]}-l{loss.lambda_mmd:g}"
    if loss.lambda_warmup:
        tag += f"-w{loss.lambda_warmup:g}"
    if loss.balance != "none":
        tag += f"-{loss.balance}"
    return f"{cfg.name}-{tag}-{digest}"


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section class behind a field's annotation (X, X | None, list[X]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((s for a in get_args(annotation) if (s := _section_of(a)) is not None), None)


def _locate(loc: tuple) -> tuple[list[str], list[str]]:
    """The dotted key of a pydantic error location, and the valid keys beside its last part."""
    model: type[BaseModel] | None = Config
    keys: list[str] = []
    siblings = list(Config.model_fields)
    for part in loc:
        if isinstance(part, int):
            keys.append(str(part))
            continue
        if model is None:  # inside a leaf type: pydantic's union/literal tags, not keys
            break
        siblings = list(model.model_fields)
        keys.append(part)
        field = model.model_fields.get(part)
        model = _section_of(field.annotation) if field else None
    return keys, siblings


def _describe(err: dict) -> str:
    keys, siblings = _locate(err["loc"])
    key = ".".join(keys)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(keys[-1], siblings, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join([*keys[:-1], close[0]])}'?" if close else ""
        return f"unknown key '{key}'{hint} (valid here: {', '.join(siblings)})"
    return f"'{key}': {err['msg']} (got {err.get('input')!r})"


def validate(data: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from plain data; every problem is reported with its dotted key."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = sorted({_describe(e) for e in exc.errors()})
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 5e-4 (no dot) as a string; numbers in scientific notation are floats here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'loss.lambda_mmd=0.3' -> (['loss', 'lambda_mmd'], 0.3); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    return key.strip().split("."), _yaml(value) if value.strip() else ""


def set_dotted(data: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """Set data[a][b][c] = value for path [a, b, c], creating sections on the way; a number indexes a list
    (`data.spurious.0.bins`)."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"'{'.'.join(path)}': '{part}' is not an index of a {len(node)}-item list")
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"'{'.'.join(path)}': '{path[i - 1]}' is a value, not a section")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        set_dotted(data, *parse_override(text))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            data = _yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return validate(apply_overrides(data, overrides or []), source)


def dump_config(cfg: Config) -> str:
    """YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
