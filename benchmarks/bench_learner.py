"""The DeepSpeed learner on Ray: steps/s of 2 data-parallel ranks over 1, and GR's cost over a plain step.

    python benchmarks/bench_learner.py      # writes benchmarks/results/learner.json, prints the two ratios

SmolLM2-135M-Instruct + LoRA (rank 16) by default, 32 sequences of 35 prompt + 32 response tokens (random ids:
the cost does not depend on the text, see bench_gr.py), micro-batches of 8, `--threads` torch threads and one
Ray CPU per rank. The same batch goes to a 1-rank (ZeRO-0) and a 2-rank (ZeRO-2) learner group; each takes a
warm-up step, then `--rounds` timed steps without a regularizer and, rebuilt, with GR; the median counts.
`policy_scaling_1_to_2` is the 1-rank step time over the 2-rank one (2.0 would be perfect scaling; the
all-reduce and each rank's fixed costs take their share), `gr_over_plain_update` GR's step time over the plain
one on the 2-rank learner (about 2: one more forward and backward). `--zero3` adds a 2-rank ZeRO-3 group and
`zero3_over_zero2`, its step time over ZeRO-2's, plain and with GR.
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

import ray
import torch
from bench_gr import batch  # the same random batch (run as a script: benchmarks/ is on the path)

from ray_crm.assets import resolve_model
from ray_crm.config import validate
from ray_crm.rl.learner_group import LearnerGroup
from ray_crm.runtime import init_ray

RESULTS = Path(__file__).parent / "results" / "learner.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="smollm2", help="an asset alias or an HF causal-LM folder")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--zero3", action="store_true",
                        help="also time 2 ranks under ZeRO-3 (weights sharded): key zero3_over_zero2")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    policy = str(resolve_model(args.policy))
    work = batch(args.sequences, 35, 32)
    timings: dict[str, dict[str, list[float]]] = {}
    for workers, zero in ((1, 0), (2, 2), *(((2, 3),) if args.zero3 else ())):
        cfg = validate({"ray": {"num_cpus": 2, "torch_threads": args.threads}, "rl": {
            "policy": policy, "num_workers": workers, "zero_stage": zero, "learner_cpus": 1.0,
            "micro_batch_size": 8, "lr": 1e-5, "regularizer": "none", "lora": {"rank": 16, "alpha": 32}}})
        init_ray(cfg.ray)
        with LearnerGroup(policy, cfg) as group:
            for regularizer in ("none", "gr"):
                if regularizer != cfg.rl.regularizer:  # the group starts with a plain learner
                    group.setup(policy, cfg.rl.model_copy(update={"regularizer": regularizer}))
                group.step(work, during="warm-up")
                times = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    group.step(work, during="timed step")
                    times.append(time.perf_counter() - t0)
                timings.setdefault(f"{workers}_ranks" + ("_zero3" if zero == 3 else ""), {})[regularizer] = times
    ray.shutdown()
    med = {ranks: {r: statistics.median(t) for r, t in by.items()} for ranks, by in timings.items()}
    result = {
        "command": "python benchmarks/bench_learner.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
                    "threads_per_rank": args.threads, "torch": torch.__version__, "loadavg_at_end": os.getloadavg()[0]},
        "policy": args.policy, "sequences": args.sequences, "tokens_per_sequence": 67,
        "step_s": med, "rounds_s": timings,
        "policy_scaling_1_to_2": med["1_ranks"]["none"] / med["2_ranks"]["none"],
        "gr_over_plain_update": med["2_ranks"]["gr"] / med["2_ranks"]["none"],
    }
    if args.zero3:  # the cost of sharding the weights: each layer gathered per pass, the adapters per write
        result["zero3_over_zero2"] = {r: med["2_ranks_zero3"][r] / med["2_ranks"][r] for r in ("none", "gr")}
        print(f"zero3_over_zero2 {result['zero3_over_zero2']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"policy_scaling_1_to_2 {result['policy_scaling_1_to_2']:.2f}")
    print(f"gr_over_plain_update {result['gr_over_plain_update']:.2f}")


if __name__ == "__main__":
    main()
