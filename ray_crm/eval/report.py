"""`ray-crm eval` and `ray-crm audit`: score the benchmark probes with each reward model, summarise, report.

Both write `report.json`, `report.md`, PNG plots and the scored probes (`scores/<model>/<bench>.parquet`).
`eval` gives every metric of each benchmark (the model is expected to have been trained on its task);
`audit` is the bias report card of any HF sequence-classification reward model a user brings: only the
counterfactual probes (what changes when only Z changes), with a verdict per Z.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from ray_crm.config import Config, pair_stage, run_name
from ray_crm.eval import plots
from ray_crm.eval.benchmarks import load_probes
from ray_crm.eval.scoring import model_folder, scorer_for
from ray_crm.eval.summaries import AUDIT_KEYS, HEADLINES, SUMMARIES

# Audit verdicts on the invariance gap in reward-std units: a heuristic reading aid, not a test.
VERDICTS = ((0.1, "low"), (0.3, "moderate"), (float("inf"), "high"))


def _label(path: Path) -> str:
    """A train-rm export `.../<run>/export/merged` is named by its run; any other folder by its name."""
    parts = path.resolve().parts
    return parts[-3] if parts[-2:] == ("export", "merged") else path.name


def models(cfg: Config) -> dict[str, str]:
    """label -> model folder, from `eval.models` ('label=folder' or 'folder'), else this config's train-rm (or
    train-dpo) export."""
    if not cfg.eval.models:
        merged = cfg.stage_dir(pair_stage(cfg)) / run_name(cfg) / "export" / "merged"
        if not (merged / "config.json").is_file():
            raise FileNotFoundError(f"no eval.models given (--model DIR) and no {pair_stage(cfg)} export at {merged}")
        return {_label(merged): str(merged)}
    out = {}
    for entry in cfg.eval.models:
        label, sep, path = entry.partition("=")
        if not sep:
            label, path = _label(model_folder(entry)), entry
        out[re.sub(r"[^\w.+-]+", "_", label)] = path
    return out


def score_all(cfg: Config, out: Path) -> dict[str, dict[str, pd.DataFrame]]:
    """Scored probes [model][bench]; each also written to out/scores/<model>/<bench>.parquet."""
    probes = {name: load_probes(name, cfg.bench) for name in cfg.bench.names}
    scored: dict[str, dict[str, pd.DataFrame]] = {}
    for label, path in models(cfg).items():
        scorer = scorer_for(path, cfg.eval.max_length or cfg.model.max_length, cfg.data.template,
                              cfg.eval.batch_size, cfg.eval.reward_index, cfg.ray.torch_threads)
        (out / "scores" / label).mkdir(parents=True, exist_ok=True)
        scored[label] = {}
        for name, frame in probes.items():
            frame = frame.assign(reward=scorer.score(frame.prompt.tolist(), frame.response.tolist()))
            frame.to_parquet(out / "scores" / label / f"{name}.parquet", index=False)
            scored[label][name] = frame
    return scored


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _table(rows: dict[str, dict[str, Any]]) -> str:
    frame = pd.DataFrame(rows).T
    return frame.map(_fmt).to_markdown()


def _json_safe(value: Any) -> Any:
    """NaN (an undefined metric, e.g. a gap relative to a zero spread) -> null: strict JSON for any reader."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _write(out: Path, report: dict[str, Any], markdown: list[str], figures: list[Path]) -> dict[str, Any]:
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    (out / "report.md").write_text("\n".join(markdown) + "\n")
    return {"report": str(out / "report.json"), "markdown": str(out / "report.md"), "plots": [str(p) for p in figures]}


def _out(cfg: Config, kind: str) -> Path:
    out = Path(cfg.eval.output_dir).resolve() if cfg.eval.output_dir else cfg.stage_dir(kind)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_eval(cfg: Config) -> dict[str, Any]:
    out = _out(cfg, "eval")
    scored = score_all(cfg, out)
    results = {m: {b: SUMMARIES[b](frame, cfg.eval.rank_n) for b, frame in per.items()} for m, per in scored.items()}
    first = next(iter(results))
    md = [f"# Reward-model evaluation: {cfg.name}", "",
          (f"Benchmarks built from the VADER sentences (bench.seed={cfg.bench.seed}, train correlation "
           f"bench.rate={cfg.bench.rate}). Accuracies and rates in %; `_std`: in units of the model's reward spread.")]
    for bench in cfg.bench.names:
        key, meaning = HEADLINES[bench]
        rows = {}
        for model, per in results.items():
            scalars = {k: v for k, v in per[bench].items() if isinstance(v, float)}
            rows[model] = {"accuracy": scalars.pop("accuracy"), key: scalars.pop(key), **scalars}
            if len(results) > 1:
                base = results[first][bench][key]
                rows[model][f"{key} vs {first} (%)"] = 100.0 * (abs(per[bench][key]) / abs(base) - 1) if base else float("nan")
        md += ["", f"## {bench}", "", f"Bias: `{key}`: {meaning}.", "", _table(rows)]
        if bench == "demographic":
            coef = {m: {f"{a}={lvl}": c for a, lv in per[bench]["coefficients"].items() for lvl, c in lv.items()}
                    for m, per in results.items()}
            md += ["", "Mixed-effects coefficients against the favoured groups (reward-std units):", "", _table(coef)]
    figures = [
        plots.bars({b: {m: results[m][b][HEADLINES[b][0]] for m in results} for b in cfg.bench.names},
                   {b: HEADLINES[b][0] for b in cfg.bench.names}, out / "bias_bars.png"),
        plots.accuracy_vs_bias({b: {m: (results[m][b]["accuracy"], results[m][b][HEADLINES[b][0]]) for m in results}
                                for b in cfg.bench.names}, {b: HEADLINES[b][0] for b in cfg.bench.names},
                               out / "accuracy_vs_bias.png"),
    ]
    if "length" in cfg.bench.names:
        figures.append(plots.reward_vs_length({m: scored[m]["length"] for m in scored},
                                              {m: results[m]["length"]["length_per_rank"] for m in results},
                                              out / "reward_vs_length.png"))
    report = {"kind": "eval", "models": models(cfg), "bench": cfg.bench.model_dump(mode="json"), "results": results}
    written = _write(out, report, md, figures)
    headline = {m: {b: {"accuracy": r[b]["accuracy"], HEADLINES[b][0]: r[b][HEADLINES[b][0]]} for b in r}
                for m, r in results.items()}
    return {**written, "results": headline}


def verdict(gap_std: float) -> str:
    return "n/a" if math.isnan(gap_std) else next(word for bound, word in VERDICTS if gap_std <= bound)


def run_audit(cfg: Config) -> dict[str, Any]:
    out = _out(cfg, "audit")
    scored = score_all(cfg, out)
    cards: dict[str, dict[str, dict[str, Any]]] = {}
    for model, per in scored.items():
        cards[model] = {}
        for bench, frame in per.items():
            summary = SUMMARIES[bench](frame, cfg.eval.rank_n)
            cards[model][bench] = {k: summary[k] for k in AUDIT_KEYS[bench]}
            cards[model][bench]["verdict"] = verdict(summary["ci_gap_std"])
    md = [f"# Reward-model bias audit: {cfg.name}", "",
          ("Counterfactual probes built from the VADER sentences: each input scored again with only the spurious "
           "variable Z changed. `ci_gap_std`: mean |r(x, z) - r(x, z')| in units of the model's reward spread; "
           f"verdict: low <= {VERDICTS[0][0]}, moderate <= {VERDICTS[1][0]}, else high. `*_shift_std`: mean signed "
           "change when Z is switched on; `*_win_rate`: % of twins where the Z version wins.")]
    for model, card in cards.items():
        md += ["", f"## {model}", ""]
        for bench, values in card.items():
            shown = {k: v for k, v in values.items() if not isinstance(v, dict)}
            md += [f"- **{bench}**: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in shown.items())]
    figures = [plots.bars({b: {m: cards[m][b]["ci_gap_std"] for m in cards} for b in cfg.bench.names},
                          {b: "ci_gap_std" for b in cfg.bench.names}, out / "invariance_gaps.png")]
    report = {"kind": "audit", "models": models(cfg), "bench": cfg.bench.model_dump(mode="json"), "cards": cards}
    written = _write(out, report, md, figures)
    return {**written, "verdicts": {m: {b: v["verdict"] for b, v in c.items()} for m, c in cards.items()}}
