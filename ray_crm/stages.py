"""The registry of stages the CLI and jobs/ can run.

Each entry names its function by import path so `ray-crm --help` starts without importing Ray, torch or
vLLM. Only stages that work are registered. A stage takes the root `Config` and returns a small dict of
what it produced (paths and headline metrics) that the CLI prints as JSON.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray_crm.config import Config


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    help: str

    def load(self) -> Callable[..., dict[str, Any]]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("demo", "ray_crm.demo:run_demo",
              "the main job: a real-text bias benchmark, vanilla vs causal RM on Ray Train, evaluation of both"),
        Stage("prepare", "ray_crm.data.pipeline:run_prepare",
              "read, validate, measure spurious variables, bin, tokenize and audit preference pairs"),
        Stage("train-rm", "ray_crm.train.rm_trainer:run_train_rm",
              "train a reward model (Bradley-Terry or causal RM) on Ray Train + DeepSpeed + LoRA, and export it"),
        Stage("train-dpo", "ray_crm.train.rm_trainer:run_train_dpo",
              "train a causal LM policy on the pairs by DPO, IPO or Causal DPO (MMD on the implicit reward across "
              "bins of Z) on Ray Train + DeepSpeed + LoRA, and export it"),
        Stage("train-rl", "ray_crm.rl.grpo_trainer:run_train_rl",
              "GRPO of a policy against a trained RM on Ray (vLLM rollouts), with gradient regularization or the "
              "KL / reference-reset baselines"),
        Stage("sweep", "ray_crm.tune.sweep:run_sweep",
              "Ray Tune sweep of regularisation strengths; results table, Pareto front, chosen config"),
        Stage("bench", "ray_crm.eval.benchmarks:run_bench",
              "build the real-text bias benchmarks (sycophancy, concept, length, demographic) for prepare"),
        Stage("eval", "ray_crm.eval.report:run_eval",
              "score reward models on the bias benchmarks: accuracy, the paper's bias metrics, plots, report"),
        Stage("audit", "ray_crm.eval.report:run_audit",
              "bias report card of any HF reward model: counterfactual probes, no training"),
    ]
}


def run_stage(name: str, cfg: Config, **options: Any) -> dict[str, Any]:
    """Run a stage; `options` are its console flags (the demo's `verbose`), not settings: those are in `cfg`."""
    return STAGES[name].load()(cfg, **options)
