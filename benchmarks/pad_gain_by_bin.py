"""Where the length penalty acts: each model's padding gain split by whether padding moves an answer across a
length-bin edge or within one bin (where a penalty that compares bins sets no constraint).

    python benchmarks/pad_gain_by_bin.py --scores outputs/crm_length_b32e2/eval/scores \
        --manifest outputs/bench_length/prepare/manifest.json --result benchmarks/results/crm_length_b32e2.json
                                                # -> benchmarks/results/pad_gain_by_bin.json

Reads the test probes `crm_seeds.py` scored (`<scores>/l<lambda>-s<seed>/length.parquet`: each answer and its
padded twin with the model's reward), the train split's bin edges from the `prepare` manifest, and the chosen
lambda from the result file. Lengths are counted in the reward model's tokens, as `prepare` counts them. Each
subset's gain is in units of the model's reward spread over all twins (the same scale as `pad_shift_std`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ray_crm.eval import metrics

OUT = Path(__file__).parent / "results" / "pad_gain_by_bin.json"


def gains(scored: pd.DataFrame, crosses: pd.Series) -> dict[str, float]:
    """Mean reward gain from padding, in reward-std units, over all twins and over each subset."""
    twins = scored.pivot_table(index="twin", columns="z", values="reward", aggfunc="first")
    scale = metrics.twin_scale(scored.reward, scored.twin)
    gain = (twins["padded"] - twins["original"]) / scale
    return {"all": float(gain.mean()), "across_bins": float(gain[crosses].mean()),
            "within_bin": float(gain[~crosses].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path, help="crm_seeds.py's result file (chosen lambda)")
    parser.add_argument("--model", default="minilm", help="the reward model's tokenizer (asset alias or folder)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    from ray_crm.assets import resolve_model
    from ray_crm.models.loading import tokenizer_at

    tok = tokenizer_at(resolve_model(args.model))
    (part,) = json.loads(args.manifest.read_text())["binning"]["parts"]
    edges = part["edges"]
    chosen = json.loads(args.result.read_text())["chosen_lambda"]
    per_model: dict[str, dict[str, float]] = {}
    crosses = None
    for folder in sorted(args.scores.iterdir()):
        scored = pd.read_parquet(folder / "length.parquet")
        if crosses is None:  # the same probes for every model
            tokens = scored.set_index(["twin", "z"]).response.map(
                lambda text: len(tok(text, add_special_tokens=False)["input_ids"])).unstack("z")
            bins = tokens.apply(lambda col: np.digitize(col, edges))
            crosses = bins["padded"] != bins["original"]
        per_model[folder.name] = gains(scored, crosses)
    vanilla = {k: v for k, v in per_model.items() if k.startswith("l0-")}
    causal = {k: v for k, v in per_model.items() if k.startswith(f"l{chosen:g}-")}
    cuts = {subset: [1 - abs(causal[f"l{chosen:g}-{k.split('-')[1]}"][subset]) / abs(v[subset])
                     for k, v in sorted(vanilla.items())] for subset in ("all", "across_bins", "within_bin")}
    result = {"command": "python benchmarks/pad_gain_by_bin.py " + " ".join(
                  f"--{k} {v}" for k, v in (("scores", args.scores), ("manifest", args.manifest),
                                            ("result", args.result))),
              "edges": edges, "twins": len(crosses), "across_bins_share": float(crosses.mean()),
              "chosen_lambda": chosen, "gain_std": per_model, "cut_by_seed": cuts,
              "mean_cut": {k: float(np.mean(v)) for k, v in cuts.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"twins crossing a bin edge: {result['across_bins_share']:.0%} of {result['twins']}")
    for subset, values in cuts.items():
        print(f"cut of the padding gain, {subset}: mean {np.mean(values):.1%} (seeds "
              + ", ".join(f"{v:.1%}" for v in values) + ")")


if __name__ == "__main__":
    main()
