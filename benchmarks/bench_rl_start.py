"""How long `train-rl` takes to start its actors: the learner, the vLLM rollout pool and the reward pool built one
after another (before) against all three at once (`ray_crm.rl.supervision.start_together`, now).

    python benchmarks/bench_rl_start.py --rounds 2     # writes benchmarks/results/rl_start.json

The main job's RL settings (`configs/demo.yaml`: SmolLM2-135M-Instruct + LoRA on one learner rank, one CPU vLLM
engine, the VADER gold scorer; no trained reward model, so the reward pool is the light part), one local Ray
cluster, one process. A warm-up build fills vLLM's compile cache first; then the two ways alternate `--rounds`
times, each building the three groups and closing them. Medians count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(cfg, policy: str, together: bool) -> float:
    """Seconds until all three groups are ready; then they are closed."""
    from ray_crm.rl.learner_group import LearnerGroup
    from ray_crm.rl.reward_actor import RewardPool
    from ray_crm.rl.rollout import RolloutPool
    from ray_crm.rl.supervision import start_together

    factories = (lambda: LearnerGroup(policy, cfg), lambda: RolloutPool(policy, cfg.rollout, cfg.ray.torch_threads),
                 lambda: RewardPool(cfg.reward, cfg.ray.torch_threads))
    start = time.perf_counter()
    groups = start_together(*factories) if together else [factory() for factory in factories]
    seconds = time.perf_counter() - start
    for group in groups:
        group.__exit__(None, None, None)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rl_start.json"))
    args = p.parse_args()
    from ray_crm.assets import resolve_model
    from ray_crm.config import load_config
    from ray_crm.runtime import init_ray

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    policy = str(resolve_model(cfg.rl.policy))
    init_ray(cfg.ray)
    warm_up = build(cfg, policy, together=False)
    rounds: dict[str, list[float]] = {"one_after_another": [], "at_once": []}
    for _ in range(args.rounds):
        for name, values in rounds.items():
            values.append(build(cfg, policy, together=name == "at_once"))
            print(name, round(values[-1], 1), flush=True)
    median = {name: statistics.median(values) for name, values in rounds.items()}
    result = {"command": "python benchmarks/bench_rl_start.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "warm_up_s": warm_up, "rounds_s": rounds, "median_s": median,
              "at_once_speedup": median["one_after_another"] / median["at_once"]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds_s"}, indent=2))


if __name__ == "__main__":
    main()
