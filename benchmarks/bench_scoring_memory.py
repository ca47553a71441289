"""Scoring many sequences with a causal LM: one big batch against batches cut to the logit budget.

    python benchmarks/bench_scoring_memory.py      # writes benchmarks/results/scoring_memory.json

SmolLM2-135M-Instruct (fp32, CPU, 2 threads) sums the response log-probs of the first `--sequences` chosen
responses of the DPO length benchmark's validation split (chat template), sorted by length as the trainer's
validation sorts them, once with batches of 128 (what the trainer's validation used) and once with
`rows_within_logit_budget`'s size. Each side runs in a fresh process, so its peak resident memory is its own;
the result says whether the scores agree and what each side cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scoring_memory.json"


def score(batch_size: int, sequences: int) -> dict:
    """One side, in this process: seconds, peak RSS and the scores."""
    import numpy as np
    import pandas as pd
    import torch

    from ray_crm.assets import resolve_model
    from ray_crm.config import load_config
    from ray_crm.data.encode import PairEncoder
    from ray_crm.models.loading import load_policy_model, pad_sequences, tokenizer_at
    from ray_crm.models.logprobs import by_length, rows_within_logit_budget, sequence_logprobs

    torch.set_num_threads(2)
    cfg = load_config(ROOT / "configs" / "dpo_length.yaml")
    frame = pd.read_parquet(cfg.data.paths["validation"][0]).head(sequences)
    path = str(resolve_model(cfg.model.name))
    enc = PairEncoder(path, cfg.model.max_length, "chat").encode(list(frame.prompt), list(frame.chosen))
    pad = tokenizer_at(path).pad_token_id
    model = load_policy_model(path, cfg.model.lora.model_copy(update={"enabled": False}), pad).eval()
    rows = batch_size or rows_within_logit_budget(model.config.vocab_size, max(map(len, enc.input_ids)), 128)
    starts = np.asarray(enc.response_starts)

    def logps(idx):
        return sequence_logprobs(model, pad_sequences([enc.input_ids[i] for i in idx], None, pad), starts[idx])

    begin = time.perf_counter()
    scores = by_length(enc.input_ids, rows, logps)
    return {"rows_per_batch": rows, "seconds": time.perf_counter() - begin,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "scores": scores.tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--side", type=int, default=None, help=argparse.SUPPRESS)  # one side, in a child process
    args = p.parse_args()
    if args.side is not None:
        print(json.dumps(score(args.side, args.sequences)))
        return
    sides = {}
    for name, size in (("batches_of_128", 128), ("within_logit_budget", 0)):
        out = subprocess.run([sys.executable, __file__, "--sequences", str(args.sequences), "--side", str(size)],
                             check=True, capture_output=True, text=True).stdout
        sides[name] = json.loads(out.strip().splitlines()[-1])
    a, b = (sides[k].pop("scores") for k in sides)
    result = {
        "command": " ".join(["python", "benchmarks/bench_scoring_memory.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(), "threads": 2,
                    "loadavg_at_start": os.getloadavg()[0]},
        "sequences": args.sequences, "sides": sides,
        "max_score_difference": max(abs(x - y) for x, y in zip(a, b, strict=True)),
        "speedup": sides["batches_of_128"]["seconds"] / sides["within_logit_budget"]["seconds"],
        "memory_ratio": sides["batches_of_128"]["peak_rss_gib"] / sides["within_logit_budget"]["peak_rss_gib"],
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
