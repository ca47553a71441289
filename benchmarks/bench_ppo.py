"""A PPO learner step (critic, GAE) against a GRPO step on the same batch, in the same process, and the critic's
share of the PPO step.

    python benchmarks/bench_ppo.py       # writes benchmarks/results/ppo.json, prints the ratio and the share

SmolLM2-135M-Instruct + LoRA (rank 16) as policy and as critic, `--sequences` sequences of 35 prompt + 32
response tokens (random ids, as bench_gr.py: the cost does not depend on the text), micro-batches of 16,
`--threads` torch threads, fp32, one pass and one minibatch (rl.epochs=1, rl.minibatches=1) for both, no
regularizer. Generation and scoring are the same for both algorithms on the same prompts, so the learner step is
where they differ. Each learner takes a warm-up step, then their steps alternate `--rounds` times; the median
counts. `ppo_over_grpo_step` is PPO's learner step over GRPO's; `critic_share_of_ppo_step` the critic's time
(its values before the update and its own update) over PPO's step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_gr import learner_bench  # the same command line and random batch (run as a script)

from ray_crm.config import RLConfig
from ray_crm.rl.policy_learner import PolicyLearner

RESULTS = Path(__file__).parent / "results" / "ppo.json"


def main() -> None:
    args, path, grpo_batch = learner_bench(__doc__)
    ppo_batch = dataclasses.replace(grpo_batch, advantages=[], rewards=grpo_batch.advantages)
    base = {"regularizer": "none", "micro_batch_size": 16, "lr": 1e-5}
    learners = {"grpo": (PolicyLearner(path, RLConfig(**base)), grpo_batch),
                "ppo": (PolicyLearner(path, RLConfig(**base, advantage="gae")), ppo_batch)}
    times: dict[str, list[float]] = {name: [] for name in learners}
    critic: list[float] = []
    for name, (learner, work) in learners.items():
        learner.step(work)  # warm-up
    for _ in range(args.rounds):
        for name, (learner, work) in learners.items():
            t0 = time.perf_counter()
            stats = learner.step(work)
            times[name].append(time.perf_counter() - t0)
            if name == "ppo":
                critic.append(stats["time/learn_critic_s"])
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "command": "python benchmarks/bench_ppo.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "loadavg_at_end": os.getloadavg()[0]},
        "sequences": args.sequences, "tokens_per_sequence": 67, "step_s": med, "rounds_s": times,
        "critic_s": critic,
        "ppo_over_grpo_step": med["ppo"] / med["grpo"],
        "critic_share_of_ppo_step": statistics.median(critic) / med["ppo"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ppo_over_grpo_step {result['ppo_over_grpo_step']:.2f}")
    print(f"critic_share_of_ppo_step {result['critic_share_of_ppo_step']:.2f}")


if __name__ == "__main__":
    main()
