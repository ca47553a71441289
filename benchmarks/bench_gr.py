"""Cost of gradient regularization: a GRPO learner step with GR against one without, in the same process.

    python benchmarks/bench_gr.py        # writes benchmarks/results/gr.json, prints a Markdown table

SmolLM2-135M-Instruct + LoRA (rank 16, q/v), 32 sequences of 35 prompt + 32 response tokens (random ids: the
cost does not depend on the text), one micro-batch of 16 at a time, 2 torch threads; fp32, then bf16 autocast.
Each configuration takes a warm-up step, then the regularizers' steps alternate `--rounds` times; the median
counts. GR costs one extra forward and backward on the same batch: the paper reports 2.5x on the policy
update (60 ms -> 150 ms), about 1% of a step dominated by generation.
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

import torch

from ray_crm.assets import resolve_model
from ray_crm.config import BF16_MIN_FD_EPS, RLConfig
from ray_crm.rl.policy_learner import PolicyBatch, PolicyLearner

RESULTS = Path(__file__).parent / "results" / "gr.json"
REGULARIZERS = ("none", "kl", "gr")


def batch(sequences: int, prompt: int, response: int) -> PolicyBatch:
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(100, 40000, (n,), generator=gen).tolist()
    return PolicyBatch([ids(prompt) for _ in range(sequences)], [ids(response) for _ in range(sequences)],
                       torch.randn(sequences, generator=gen).tolist(), [[0.0] * response] * sequences,
                       temperature=0.7, max_new_tokens=response)


def learner_bench(doc: str) -> tuple[argparse.Namespace, Path, PolicyBatch]:
    """What the single-process learner benchmarks share: their command line (`--sequences`, `--rounds`,
    `--threads`, torch's threads set from it), the policy's folder and the random batch."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args, resolve_model("smollm2"), batch(args.sequences, 35, 32)


def alternate_steps(learners: dict[str, PolicyLearner], work: PolicyBatch, rounds: int) -> dict[str, list[float]]:
    """Each learner's step times on `work`: a warm-up step each, then `rounds` rounds of one step each, in turn
    (so a slow spell of the machine falls on every side)."""
    times: dict[str, list[float]] = {name: [] for name in learners}
    for learner in learners.values():
        learner.step(work)
    for _ in range(rounds):
        for name, learner in learners.items():
            t0 = time.perf_counter()
            learner.step(work)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    args, path, work = learner_bench(__doc__)
    result = {"command": "python benchmarks/bench_gr.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
                          "threads": args.threads, "torch": torch.__version__, "loadavg_at_start": os.getloadavg()[0]},
              "sequences": args.sequences, "tokens_per_sequence": 67}
    rows = []
    for precision in ("fp32", "bf16"):
        fd = {"gr_fd_eps": BF16_MIN_FD_EPS} if precision == "bf16" else {}  # bf16 cannot resolve a smaller GR step
        learners = {r: PolicyLearner(path, RLConfig(precision=precision, regularizer=r, micro_batch_size=16, lr=1e-5,
                                                    **(fd if r == "gr" else {})))
                    for r in REGULARIZERS}
        times = alternate_steps(learners, work, args.rounds)
        med = {r: statistics.median(t) for r, t in times.items()}
        result[precision] = {"step_s": med, "rounds_s": times, "gr_over_none": med["gr"] / med["none"],
                             "kl_over_none": med["kl"] / med["none"]}
        rows.append(f"| {precision} | {med['none']:.2f} | {med['kl']:.2f} | {med['gr']:.2f} | "
                    f"{med['gr'] / med['none']:.2f}x |")
        del learners
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(["| precision | none (s/step) | kl | gr | gr_over_none |", "|---|---:|---:|---:|---:|", *rows]))


if __name__ == "__main__":
    main()
