"""What taking the old log-probs from the first gradient pass saves: a learner step with a forward pass of its own
for them against one without, in the same process.

    python benchmarks/bench_old_logprobs.py    # writes benchmarks/results/old_logprobs.json, prints a table

The batch and model of `bench_gr.py` (SmolLM2-135M-Instruct + LoRA, 32 random sequences of 35 + 32 tokens,
micro-batches of 16, fp32, 2 torch threads). With one update per batch (`rl.epochs=1`, `rl.minibatches=1`, no
critic: the default) the learner's first gradient pass is at the old weights, so its log-probs, detached, are the
old ones; a learner with `old_from_first_pass` switched off runs the separate no-grad forward it needed before.
For each regularizer both learners take a warm-up step, then alternate `--rounds` timed steps; the median counts.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_gr import learner_bench  # run as a script: benchmarks/ is on the path

from ray_crm.config import RLConfig
from ray_crm.rl.policy_learner import PolicyLearner

RESULTS = Path(__file__).parent / "results" / "old_logprobs.json"


def main() -> None:
    args, path, work = learner_bench(__doc__)
    result = {"command": "python benchmarks/bench_old_logprobs.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
                          "threads": args.threads, "torch": torch.__version__, "loadavg_at_start": os.getloadavg()[0]},
              "sequences": args.sequences, "tokens_per_sequence": 67}
    rows = []
    for regularizer in ("none", "gr"):
        sides = {}
        for reuse in (False, True):
            sides[reuse] = PolicyLearner(path, RLConfig(regularizer=regularizer, micro_batch_size=16, lr=1e-5))
            sides[reuse].old_from_first_pass = reuse
            sides[reuse].step(work)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for reuse, learner in sides.items():
                t0 = time.perf_counter()
                learner.step(work)
                times[reuse].append(time.perf_counter() - t0)
        recompute, first_pass = (statistics.median(times[k]) for k in (False, True))
        result[regularizer] = {"recompute_s": recompute, "first_pass_s": first_pass,
                               "rounds_recompute_s": times[False], "rounds_first_pass_s": times[True],
                               "first_pass_over_recompute": first_pass / recompute}
        rows.append(f"| {regularizer} | {recompute:.2f} | {first_pass:.2f} | {first_pass / recompute:.3f} |")
        del sides
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(["| regularizer | recompute (s/step) | first pass (s/step) | first_pass_over_recompute |",
                     "|---|---:|---:|---:|", *rows]))


if __name__ == "__main__":
    main()
