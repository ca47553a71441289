"""How strongly each spurious variable predicts the preference label, before any GPU hour is spent.

Every response is a sample labelled chosen or rejected. For each Z: the chi-square test and Cramér's V of
label x (fitted bin of Z) - one comparable association measure for every kind of Z - plus, for a continuous
Z, the distribution of z(chosen) - z(rejected) and the accuracy a reward of Z alone would reach
(P(z_chosen > z_rejected) + P(tie)/2), and for a discrete Z the share of chosen vs rejected responses in each
category. Verdicts use Cohen's conventions for V (0.1 small, 0.3 medium, 0.5 large) at p < 0.01.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import chi2_contingency

TOP_CATEGORIES = 12


def _verdict(v: float, p: float) -> str:
    if p >= 0.01 or v < 0.1:
        return "none"
    return "large" if v >= 0.5 else "medium" if v >= 0.3 else "small"


def _association(bins_chosen: np.ndarray, bins_rejected: np.ndarray, num_bins: int) -> dict[str, float]:
    table = np.stack([np.bincount(bins_chosen, minlength=num_bins), np.bincount(bins_rejected, minlength=num_bins)])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return {"chi2": 0.0, "p_value": 1.0, "cramers_v": 0.0}
    chi2, p, _, _ = chi2_contingency(table, correction=False)
    return {"chi2": float(chi2), "p_value": float(p), "cramers_v": float(np.sqrt(chi2 / table.sum()))}


def _continuous(zc: np.ndarray, zr: np.ndarray) -> dict[str, Any]:
    diff = zc.astype(np.float64) - zr.astype(np.float64)
    higher, tie = float(np.mean(diff > 0)), float(np.mean(diff == 0))
    q = np.quantile(diff, [0.1, 0.25, 0.5, 0.75, 0.9]) if diff.size else np.zeros(5)
    return {
        "share_chosen_higher": higher,
        "share_tie": tie,
        "share_rejected_higher": 1.0 - higher - tie,
        "z_only_accuracy": higher + tie / 2,
        "diff_mean": float(diff.mean()) if diff.size else 0.0,
        "diff_quantiles": dict(zip(("p10", "p25", "p50", "p75", "p90"), map(float, q))),
        "mean_chosen": float(zc.mean()) if zc.size else 0.0,
        "mean_rejected": float(zr.mean()) if zr.size else 0.0,
    }


def _discrete(zc: np.ndarray, zr: np.ndarray) -> dict[str, Any]:
    cats, counts = np.unique(np.concatenate([zc, zr]).astype(str), return_counts=True)
    top = cats[np.argsort(-counts, kind="stable")][:TOP_CATEGORIES]
    shares = {str(c): {"chosen": float(np.mean(zc.astype(str) == c)), "rejected": float(np.mean(zr.astype(str) == c))}
              for c in top}
    return {"categories": shares, "share_differs": float(np.mean(zc.astype(str) != zr.astype(str))) if len(zc) else 0.0,
            "n_categories": len(cats)}


def audit(
    z_chosen: Mapping[str, np.ndarray],
    z_rejected: Mapping[str, np.ndarray],
    bins_chosen: Mapping[str, np.ndarray],
    bins_rejected: Mapping[str, np.ndarray],
    num_bins: Mapping[str, int],
    continuous: Mapping[str, bool],
) -> dict[str, Any]:
    """The audit of every Z: association with the label, and the kind-specific view."""
    report: dict[str, Any] = {}
    for name in z_chosen:
        zc, zr = np.asarray(z_chosen[name]), np.asarray(z_rejected[name])
        stats = {"kind": "continuous" if continuous[name] else "discrete", "pairs": len(zc),
                 "bins": int(num_bins[name])}
        stats |= _association(bins_chosen[name], bins_rejected[name], num_bins[name])
        stats |= _continuous(zc, zr) if continuous[name] else _discrete(zc, zr)
        stats["signal"] = _verdict(stats["cramers_v"], stats["p_value"])
        report[name] = stats
    return report


def _headline(stats: Mapping[str, Any]) -> str:
    if stats["kind"] == "continuous":
        return (f"chosen higher {stats['share_chosen_higher']:.1%}, tie {stats['share_tie']:.1%}, "
                f"mean diff {stats['diff_mean']:+.2f}, Z-only accuracy {stats['z_only_accuracy']:.1%}")
    cats = stats["categories"]
    gap = max(cats, key=lambda c: abs(cats[c]["chosen"] - cats[c]["rejected"]), default=None)
    if gap is None:
        return "no values"
    return f"'{gap}': {cats[gap]['chosen']:.1%} of chosen vs {cats[gap]['rejected']:.1%} of rejected"


def format_table(report: Mapping[str, Any]) -> str:
    rows = [("Z", "kind", "bins", "Cramér's V", "p", "signal", "what it looks like")]
    rows += [(name, s["kind"], str(s["bins"]), f"{s['cramers_v']:.3f}", f"{s['p_value']:.2g}", s["signal"],
              _headline(s)) for name, s in report.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def plot(report: Mapping[str, Any], z_chosen: Mapping[str, np.ndarray], z_rejected: Mapping[str, np.ndarray],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report), figsize=(5.5 * len(report), 4), squeeze=False)
    for ax, (name, stats) in zip(axes[0], report.items()):
        if stats["kind"] == "continuous":
            diff = np.asarray(z_chosen[name], np.float64) - np.asarray(z_rejected[name], np.float64)
            ax.hist(diff, bins=min(60, max(10, len(np.unique(diff)))), color="tab:blue", alpha=0.8)
            ax.axvline(0, color="black", lw=1)
            ax.set_xlabel(f"z_{name}(chosen) - z_{name}(rejected)")
            ax.set_ylabel("pairs")
        else:
            cats = list(stats["categories"])
            x = np.arange(len(cats))
            ax.bar(x - 0.2, [stats["categories"][c]["chosen"] for c in cats], 0.4, label="chosen")
            ax.bar(x + 0.2, [stats["categories"][c]["rejected"] for c in cats], 0.4, label="rejected")
            ax.set_xticks(x, cats, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel("share of responses")
            ax.legend()
        extra = f", chosen higher {stats['share_chosen_higher']:.0%}" if stats["kind"] == "continuous" else ""
        ax.set_title(f"{name}: Cramér's V {stats['cramers_v']:.3f} ({stats['signal']}){extra}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_audit(report: Mapping[str, Any], z_chosen: Mapping[str, np.ndarray], z_rejected: Mapping[str, np.ndarray],
                out_dir: Path) -> dict[str, str]:
    """audit.json, audit.png and the printed table; returns the paths."""
    json_path, png_path = out_dir / "audit.json", out_dir / "audit.png"
    json_path.write_text(json.dumps(report, indent=2))
    plot(report, z_chosen, z_rejected, png_path)
    print(format_table(report), flush=True)
    return {"json": str(json_path), "png": str(png_path)}
