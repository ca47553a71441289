"""What the policy learner's batch layout saves: a step on right-padded rows with a forward pass of its own for
the old log-probs (how the learner worked before), on packed rows (`rl.pack_tokens=512`), and on packed rows
taking the old log-probs from the first gradient pass, in the same process. (The default now is right-padded rows
with the first-pass log-probs: packing did not pay on this CPU.)

    python benchmarks/bench_learner_step.py    # writes benchmarks/results/learner_step.json, prints a table

SmolLM2-135M-Instruct + LoRA (rank 16), fp32, 2 torch threads, one process (no Ray), `--sequences` random
sequences of 35-44 prompt + 8-48 response tokens (the RL experiments' shape: ~20% of a right-padded micro-batch
is padding), micro-batches of 16. Packed rows (`rl.pack_tokens=512`) hold whole sequences with position ids
restarting at each, so the model masks attention block-diagonally and computes no padding; on this CPU sdpa
still computes each row's full attention under the mask, so part of the saving is paid back. With one update per
batch (`rl.epochs=1`, `rl.minibatches=1`, no critic) the first gradient pass is at the old weights, so its
detached log-probs are the old ones: one forward pass fewer. Every variant takes a warm-up step and then the
variants alternate `--rounds` steps on the same batch; medians count. All take the same steps, so their weights
must end equal up to fp32 summation order (`max_weight_gap`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
from bench_gr import alternate_steps, learner_bench  # run as a script: benchmarks/ is on the path

from ray_crm.config import RLConfig
from ray_crm.rl.policy_learner import PolicyBatch, PolicyLearner

RESULTS = Path(__file__).parent / "results" / "learner_step.json"
# name -> (rl.pack_tokens, old log-probs from the first gradient pass)
VARIANTS = {"padded_recompute": (0, False), "packed_recompute": (512, False), "packed_first_pass": (512, True)}


def ragged_batch(sequences: int, max_new_tokens: int = 48) -> PolicyBatch:
    gen = torch.Generator().manual_seed(0)
    ids = lambda low, high: torch.randint(100, 40000, (int(torch.randint(low, high + 1, (1,), generator=gen)),),
                                          generator=gen).tolist()
    prompts = [ids(35, 44) for _ in range(sequences)]
    responses = [ids(8, max_new_tokens) for _ in range(sequences)]
    return PolicyBatch(prompts, responses, torch.randn(sequences, generator=gen).tolist(),
                       [[0.0] * len(r) for r in responses], temperature=0.7, max_new_tokens=max_new_tokens)


def main() -> None:
    args, path, _ = learner_bench(__doc__)  # bench_gr's command line, model and threads; a ragged batch here
    work = ragged_batch(args.sequences)
    lengths = [len(p) + len(r) for p, r in zip(work.prompt_ids, work.response_ids, strict=True)]
    result = {"command": "python benchmarks/bench_learner_step.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
                          "threads": args.threads, "torch": torch.__version__, "loadavg_at_start": os.getloadavg()[0]},
              "sequences": args.sequences, "micro_batch_size": 16,
              "padding_share": 1 - sum(lengths) / sum(max(lengths[i : i + 16]) * len(lengths[i : i + 16])
                                                      for i in range(0, len(lengths), 16))}
    rows = []
    for regularizer in ("none", "gr"):
        learners = {}
        for name, (pack, first_pass) in VARIANTS.items():
            learners[name] = PolicyLearner(path, RLConfig(regularizer=regularizer, micro_batch_size=16, lr=1e-5,
                                                          pack_tokens=pack))
            learners[name].old_from_first_pass = first_pass
        times = alternate_steps(learners, work, args.rounds)
        med = {name: statistics.median(t) for name, t in times.items()}
        base = learners["padded_recompute"].params
        gap = max(float((a - b).detach().abs().max()) for other in learners.values() for a, b in zip(base, other.params))
        result[regularizer] = {"step_s": med, "rounds_s": times, "max_weight_gap": gap,
                               **{f"padded_recompute_over_{name}": med["padded_recompute"] / med[name]
                                  for name in VARIANTS if name != "padded_recompute"}}
        rows += [f"| {regularizer} | {name} | {t:.2f} | {med['padded_recompute'] / t:.2f} |" for name, t in med.items()]
        del learners
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"padding share {result['padding_share']:.2f}")
    print("\n".join(["| regularizer | layout | s/step | speed-up over padded_recompute |", "|---|---|---:|---:|", *rows]))


if __name__ == "__main__":
    main()
