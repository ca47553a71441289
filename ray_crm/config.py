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
from pydantic import BaseModel, ConfigDict, Field, ValidationError


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


class Config(Section):
    """The root: every stage reads the sections it needs."""

    name: str = "run"
    output_dir: str = "outputs"
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

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


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
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
