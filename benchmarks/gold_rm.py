"""The gold reward model of the GR-vs-KL experiment: train it, then measure it on held-out pairs by kind.

    python benchmarks/gold_rm.py                 # -> benchmarks/results/gold_rm.json
    python benchmarks/gold_rm.py --set train.lr=1e-4

`configs/gold_rm.yaml`: clean VADER preference pairs plus off-topic pairs (an on-topic sentence beats a more
positive sentence of another source), SmolLM2-135M-Instruct as a sequence classifier with LoRA: another backbone
and other data than the proxy RMs, so it shares neither their shortcuts nor the lexicon's blind spot. Prepare and
train-rm run as the CLI runs them (a finished run is reused); then the export scores the test split, which no
step saw, and the VADER lexicon scores the same pairs. Reported per kind (rating, off_topic): pairwise accuracy
with its 95% Wilson interval (scipy), for the gold RM and for the lexicon (which prefers the more positive sentence,
whatever was asked).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from ray_crm.config import load_config
from ray_crm.data.pipeline import read_prepared_table
from ray_crm.eval.scoring import RewardScorer
from ray_crm.rl.reward_actor import VaderScorer
from ray_crm.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]


def accuracy(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    wins = int((chosen > rejected).sum())
    ci = binomtest(wins, len(chosen)).proportion_ci(method="wilson")
    return {"accuracy": 100 * wins / len(chosen), "ci95": [float(100 * ci.low), float(100 * ci.high)], "pairs": len(chosen)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "gold_rm.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gold_rm.json"))
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides)
    if not (cfg.prepared_dir() / "manifest.json").is_file():
        run_stage("prepare", cfg)
    trained = run_stage("train-rm", cfg)
    test = read_prepared_table(cfg.prepared_dir(), "test", ["prompt", "chosen", "rejected", "kind"]).to_pandas()
    rm = RewardScorer(trained["model"], cfg.model.max_length, cfg.data.template, threads=cfg.ray.num_cpus)
    lexicon = VaderScorer()
    result = {"command": "python benchmarks/gold_rm.py " + " ".join(f"--set {o}" for o in args.overrides),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "model": trained["model"], "validation": {k: v for k, v in trained.items() if k.startswith("val_")},
              "test": {}}
    for kind, rows in [("all", test), *test.groupby("kind")]:
        scores = {}
        for name, scorer in (("gold_rm", rm), ("vader_lexicon", lexicon)):
            c, r = (np.asarray(scorer.score(list(rows.prompt), list(rows[side])), dtype=float)
                    for side in ("chosen", "rejected"))
            scores[name] = accuracy(c, r)
        result["test"][kind] = scores
        print(f"{kind:10s} " + "  ".join(f"{n} {s['accuracy']:.1f}% [{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}] "
                                         f"of {s['pairs']}" for n, s in scores.items()))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
