"""Train files for two probes of the sycophancy benchmark's obstacle (docs/RESULTS.md, sycophancy section): the
train pairs with the flattering phrase removed (what the task is without the shortcut), or resampled so that the
phrase is on the rejected side as often as on the chosen one (mirror-balanced by sampling, not by weights).

    ray-crm bench --config configs/bench_sycophancy.yaml
    python benchmarks/probe_pairs.py strip outputs/bench/sycophancy/train.parquet outputs/bench_strip/train.parquet
    python benchmarks/probe_pairs.py resample outputs/bench/sycophancy/train.parquet outputs/bench_resample/train.parquet
    ray-crm prepare --config configs/bench_sycophancy.yaml name=probe_strip \
        data.output_dir=outputs/probe_strip/prepare "data.paths.train=[outputs/bench_strip/train.parquet]"
    ray-crm train-rm --config configs/bench_sycophancy.yaml name=probe_strip \
        data.output_dir=outputs/probe_strip/prepare "data.paths.train=[outputs/bench_strip/train.parquet]" train.lr=5e-4

Resampling draws as many pairs as the file holds with `mirror_resample_index` of (phrase on the chosen, phrase on
the rejected), as `loss.balance=mirror_sample` does inside the trainer; the prepare stage quarantines duplicate
pairs, so the k-th copy of a pair gets k trailing spaces on its prompt, which the tokenizer drops.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ray_crm.eval.benchmarks import PREFIX
from ray_crm.losses import mirror_resample_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["strip", "resample"])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pairs = pd.read_parquet(args.source)
    if args.mode == "strip":
        for side in ("chosen", "rejected"):
            pairs[side] = pairs[side].str.replace(f"{PREFIX} ", "", regex=False)
    else:
        on = {side: pairs[side].str.startswith(PREFIX).astype(int).to_numpy() for side in ("chosen", "rejected")}
        idx = mirror_resample_index(on["chosen"], on["rejected"], seed=args.seed)
        pairs = pairs.iloc[idx].reset_index(drop=True)
        copy = pairs.groupby(idx).cumcount().to_numpy()
        pairs["prompt"] = [prompt + " " * int(k) for prompt, k in zip(pairs.prompt, copy, strict=True)]
        print(f"{len(pairs)} pairs, {len(set(idx))} distinct")
    args.target.parent.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(args.target)


if __name__ == "__main__":
    main()
