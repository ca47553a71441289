"""How surely each penalty sees a dependence of the reward on Z in one training batch: bins (MMD between Z's
quantile bins) against `z_kernel=rbf` (HSIC against Z's values).

    python benchmarks/penalty_sensitivity.py --prepared outputs/bench_length/prepare
                                                # -> benchmarks/results/penalty_sensitivity.json

Draws batches of Z from the prepared train split (chosen answers' lengths; bin edges from its manifest), plants a
reward r = a * trend(Z) + N(0, 1) and reports, per penalty, how many standard deviations of the independent case
(a = 0) the mean penalty moves: a signal-to-noise ratio of the penalty as one batch measures it; and the ratio
of their sizes (what converts a lambda of one into the other). Trends: `global`
(r rises with standardized Z everywhere) and `top_bin` (r rises only past the top bin's lower edge, where padding
takes an answer). Both penalties use the default kernel on the rewards (standardized, RBF mixture 0.5-4).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ray_crm.data.pipeline import read_prepared_table
from ray_crm.losses import MMDConfig, binned_mmd_penalty, z_dependence

OUT = Path(__file__).parent / "results" / "penalty_sensitivity.json"
KERNEL = (0.5, 1.0, 2.0, 4.0)


def penalties(z_pool: np.ndarray, edges: list[float], trend: str, strength: float, batch: int, draws: int,
              rng: np.random.Generator) -> np.ndarray:
    """[draws, 2]: the binned and the HSIC penalty of each batch."""
    binned = MMDConfig(bandwidth=KERNEL, standardize=True, num_bins=len(edges) + 1)
    by_value = MMDConfig(bandwidth=KERNEL, standardize=True, z_kernel="rbf")
    out = np.empty((draws, 2))
    for i in range(draws):
        z = torch.as_tensor(rng.choice(z_pool, batch), dtype=torch.float64)
        shape = (z - z_pool.mean()) / z_pool.std() if trend == "global" else (z - edges[-1]).clamp_min(0) / z_pool.std()
        r = strength * shape + torch.as_tensor(rng.standard_normal(batch))
        bins = torch.bucketize(z, torch.tensor(edges, dtype=torch.float64), right=True)
        out[i] = float(binned_mmd_penalty(r, bins, binned)[0]), float(z_dependence(r, z, by_value)[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True, type=Path, help="a `prepare` output folder")
    parser.add_argument("--z", default="length", help="the spurious variable's name")
    parser.add_argument("--batch", type=int, default=32, help="rewards per penalty group (pairs per batch, conditional)")
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.6])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    torch.set_num_threads(1)
    manifest = json.loads((args.prepared / "manifest.json").read_text())
    part = manifest["binning"]["parts"][manifest["binning"]["names"].index(args.z)]
    edges = [float(e) for e in part["edges"]]
    z_pool = read_prepared_table(args.prepared, "train").column(f"z_{args.z}_chosen").to_numpy().astype(float)
    rng = np.random.default_rng(0)
    null = penalties(z_pool, edges, "global", 0.0, args.batch, args.draws, rng)
    rows = []
    for trend in ("global", "top_bin"):
        for a in args.strengths:
            planted = penalties(z_pool, edges, trend, a, args.batch, args.draws, rng)
            snr = (planted.mean(0) - null.mean(0)) / null.std(0)
            size = planted.mean(0)
            rows.append({"trend": trend, "strength": a, "snr_bins": float(snr[0]), "snr_rbf": float(snr[1]),
                         "bins_over_rbf": float(size[0] / size[1])})
            print(f"{trend:8s} a={a:g}: bins {snr[0]:.2f} sd, rbf {snr[1]:.2f} sd; size bins / rbf {size[0] / size[1]:.0f}")
    result = {"command": "python benchmarks/penalty_sensitivity.py --prepared " + str(args.prepared),
              "z": args.z, "edges": edges, "batch": args.batch, "draws": args.draws,
              "z_percentiles": dict(zip(("p1", "p50", "p99"), np.percentile(z_pool, [1, 50, 99]).tolist())),
              "null_bins_over_rbf": float(null.mean(0)[0] / null.mean(0)[1]), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
