"""One typed config schema for every stage: YAML files plus dotted command-line overrides.

The same `Config` object is what the CLI, `jobs/` and Ray Tune trials receive, so a parameter such as
`loss.lambda_mmd` travels one road: YAML/CLI -> Config -> trainer -> loss. Unknown keys and wrong types
are rejected with the dotted key and, for typos, the closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class Section(BaseModel):
    """Base of every section: no unknown keys, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class RayConfig(Section):
    """Where the work runs. `address=None` starts a local Ray cluster on this machine."""

    address: str | None = None
    num_cpus: int | None = None
    torch_threads: int = Field(1, ge=1, description="torch threads in every Ray worker and actor")


class LoraConfig(Section):
    enabled: bool = True
    rank: int = Field(64, ge=1)
    alpha: int = Field(128, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="None: the backbone's attention projections")


class ModelConfig(Section):
    """A backbone: an asset alias ('minilm', 'smollm2') or a path to an HF folder."""

    name: str = "minilm"
    max_length: int = Field(128, ge=8)
    precision: Literal["fp32", "bf16"] = "fp32"
    lora: LoraConfig = Field(default_factory=LoraConfig)


class MMDConfig(Section):
    bandwidth: Literal["median"] | float | list[float] = "median"
    unbiased: bool = False
    reduction: Literal["sum", "mean"] = "sum"
    on: Literal["reward", "representation"] = "reward"


class LossConfig(Section):
    """Bradley-Terry, or causal RM = BT + lambda * sum of MMD between bins of Z."""

    type: Literal["bt", "crm"] = "bt"
    variant: Literal["unconditional", "conditional"] = "unconditional"
    lambda_mmd: float = Field(0.0, ge=0.0)
    mmd: MMDConfig = Field(default_factory=MMDConfig)


class TrainConfig(Section):
    """Ray Train + DeepSpeed settings. Batch sizes are global (summed over workers) in pairs."""

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0.0)
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False
    batch_size: int = Field(16, ge=2)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(-1, description="stop after this many optimizer steps; -1: run all epochs")
    eval_every: int = Field(0, ge=0, description="validate every N steps as well as each epoch; 0: epochs only")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps as well as each epoch")
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_metric: str = "val_accuracy"
    max_failures: int = Field(1, ge=0)
    seed: int = 0


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
    enforce_eager: bool = Field(True, description="no torch.compile (and no CUDA graphs): fast start")
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
    seed: int | None = Field(0, description="per-request seeds derived from it; None: unseeded sampling")
    start_timeout_s: float = Field(600.0, gt=0.0, description="engine start-up, also after a restart")
    generate_timeout_s: float = Field(900.0, gt=0.0, description="one engine's share of a generate call")
    sync_timeout_s: float = Field(120.0, gt=0.0, description="one engine's weight reload")
    max_restarts: int = Field(2, ge=0, description="Ray restarts of a dead or hung engine; its batch is retried once")


class GoldScorerConfig(Section):
    """A scorer used only to measure reward hacking, never to train: another RM, or a rule (VADER)."""

    name: str = Field(description="metric key: its scores appear as gold/<name>")
    kind: Literal["reward_model", "vader"] = "reward_model"
    model: str | None = Field(None, description="reward_model: an HF sequence-classification folder or asset alias")


class RewardConfig(Section):
    """Reward actors serving the trained reward model during PPO/GRPO, plus optional gold scorers."""

    model: str | None = Field(None, description="the trained RM: an HF sequence-classification folder")
    input_format: Literal["pair", "chat", "response"] = Field(
        "pair", description="pair: tokenizer(prompt, response); chat: user/assistant template; response: alone"
    )
    actors: int = Field(1, ge=1, description="actors serving the trained RM; a batch is split over them")
    cpus_per_actor: float = Field(0.5, gt=0.0)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    threads: int | None = Field(None, ge=1, description="torch threads per actor; None: ray.torch_threads")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(512, ge=8)
    precision: Literal["fp32", "bf16"] = "fp32"
    gold: list[GoldScorerConfig] = Field(default_factory=list)
    start_timeout_s: float = Field(300.0, gt=0.0)
    call_timeout_s: float = Field(300.0, gt=0.0)
    max_restarts: int = Field(2, ge=0)


class SearchSpace(Section):
    """One swept key: exactly one of grid (every value), choice (sampled), uniform or loguniform ([low, high])."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: list[float] | None = Field(None, min_length=2, max_length=2)
    loguniform: list[float] | None = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchSpace":
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        if self.loguniform is not None and min(self.loguniform) <= 0:
            raise ValueError("loguniform bounds must be > 0")
        return self


class SweepConfig(Section):
    """Ray Tune over a stage's entry: search space keyed by dotted config keys; accuracy vs bias."""

    stage: Literal["train-rm"] = "train-rm"
    space: dict[str, SearchSpace] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1, description="repeats of the grid, or draws for choice/uniform")
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    bias_metric: str = "val_mmd"
    bias_mode: Literal["max", "min"] = "min"
    max_accuracy_drop: float = Field(0.02, ge=0.0, description="pick the least biased config within this of the best")
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial can be stopped")
    search: Literal["basic", "optuna"] = "basic"
    max_concurrent_trials: int = Field(1, ge=1)
    resume: bool = False


class Config(Section):
    """The root: every stage reads the sections it needs."""

    name: str = "run"
    output_dir: str = "outputs"
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)

    def stage_dir(self, stage: str) -> Path:
        """Where a stage of this run writes: <output_dir>/<name>/<stage>."""
        return Path(self.output_dir).resolve() / self.name / stage


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


def parse_override(text: str) -> tuple[list[str], Any]:
    """'loss.lambda_mmd=0.3' -> (['loss', 'lambda_mmd'], 0.3); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def set_dotted(data: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """Set data[a][b][c] = value for path [a, b, c], creating sections on the way."""
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(path)}': '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value
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
            data = yaml.safe_load(Path(path).read_text()) or {}
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
