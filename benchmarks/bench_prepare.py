"""Throughput of `ray-crm prepare` (issue #3): rows/s with and without tokenization, at 1 and 2 CPUs.

    python benchmarks/bench_prepare.py        # writes benchmarks/results/prepare.json, prints a Markdown table

Input: --pairs (default 100,000) preference pairs built from the real VADER sentences (`ray-crm assets` first),
written as 4 JSONL shards, as real preference sets come, so the read stage has parallel work too. The whole
stage is timed: read + validate + duplicates + Z + (tokenize) + bins + audit + Parquet + manifest.
- with tokenization: all-MiniLM-L6-v2's WordPiece tokenizer, (prompt, response) text pairs, max length 128,
  length Z in tokens;
- without: no tokenizer loaded at all, length Z in words.
Each (CPUs, tokenize) cell runs in a fresh process with its own local Ray cluster of that many CPUs: a warm-up
prepare of 2,000 pairs (Ray Data's worker processes start and import), then the best of --rounds timed runs in
wall time. The machine may be shared: the 1-minute load average before each run is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "prepare.json"
SHARDS = 4
WARMUP_PAIRS = 2000


def write_inputs(pairs: int, root: Path) -> tuple[list[str], str]:
    """VADER pairs as JSONL shards, plus a small warm-up file."""
    import pyarrow.parquet as pq

    from ray_crm.assets import asset_dir
    from ray_crm.data.vader import build_pairs

    table = build_pairs(pq.read_table(asset_dir("vader") / "vader_sentences.parquet"), pairs, seed=0)
    rows = table.select(["prompt", "chosen", "rejected", "source"]).to_pylist()
    shards = []
    for i in range(SHARDS):
        path = root / f"pairs-{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[i::SHARDS]))
        shards.append(str(path))
    warm = root / "warmup.jsonl"
    warm.write_text("".join(json.dumps(r) + "\n" for r in rows[:WARMUP_PAIRS]))
    return shards, str(warm)


def config(paths: list[str], out: Path, tokenize: bool):
    from ray_crm.config import validate

    return validate({
        "name": "bench",
        "output_dir": str(out),
        "model": {"name": "minilm", "max_length": 128},
        "data": {
            "paths": paths,
            "tokenize": tokenize,
            "split": {"by": "pair"},
            "spurious": [{"name": "length", "kind": "length", "unit": "tokens" if tokenize else "words"}],
        },
    })


def run_cell(cpus: int, tokenize: bool, shards: list[str], warm: str, rounds: int) -> dict:
    """One cell, inside its own process: start Ray, warm up, time `rounds` full runs."""
    from ray_crm.config import RayConfig
    from ray_crm.data.pipeline import run_prepare
    from ray_crm.runtime import init_ray

    start = time.perf_counter()
    init_ray(RayConfig(num_cpus=cpus))
    ray_start = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_prepare(config([warm], Path(tmp) / "warm", tokenize))
        warmup = time.perf_counter() - start
        runs = []
        for _ in range(rounds):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            result = run_prepare(config(shards, Path(tmp) / "full", tokenize))
            seconds = time.perf_counter() - start
            rows = sum(result["pairs"].values()) + result["quarantined"]
            stages = json.loads(Path(result["manifest"]).read_text())["stage_seconds"]
            runs.append({"seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1), "load_1min": load,
                         "stage_seconds": stages})
    best = max(runs, key=lambda r: r["rows_per_s"])
    return {"cpus": cpus, "tokenize": tokenize, "rows": rows, "ray_start_s": round(ray_start, 2),
            "warmup_s": round(warmup, 2), "runs": runs, **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: "cpus,tokenize,workdir,result_file"
    args = parser.parse_args()
    if args.cell:
        cpus, tokenize, workdir, result_file = args.cell.split(",")
        shards = sorted(str(p) for p in Path(workdir).glob("pairs-*.jsonl"))
        cell = run_cell(int(cpus), tokenize == "1", shards, str(Path(workdir) / "warmup.jsonl"), args.rounds)
        Path(result_file).write_text(json.dumps(cell))
        return

    cells = []
    with tempfile.TemporaryDirectory() as workdir:
        write_inputs(args.pairs, Path(workdir))
        for tokenize in (False, True):
            for cpus in args.cpus:
                result_file = Path(workdir) / f"cell-{cpus}-{int(tokenize)}.json"
                spec = f"{cpus},{int(tokenize)},{workdir},{result_file}"
                subprocess.run([sys.executable, __file__, "--cell", spec, "--rounds", str(args.rounds)], check=True,
                               stdout=subprocess.DEVNULL)
                cells.append(json.loads(result_file.read_text()))
                print(f"cpus={cpus} tokenize={tokenize}: {cells[-1]['rows_per_s']} rows/s", flush=True)
    by = {(c["cpus"], c["tokenize"]): c["rows_per_s"] for c in cells}
    scaling = {("tokenize" if t else "no_tokenize"): round(by[(max(args.cpus), t)] / by[(min(args.cpus), t)], 2)
               for t in (False, True) if len(args.cpus) > 1}
    from importlib.metadata import version

    report = {
        "pairs": args.pairs,
        "shards": SHARDS,
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "ray": version("ray"),
                    "transformers": version("transformers"), "tokenizers": version("tokenizers")},
        "cells": cells,
        "scaling": scaling,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print("| tokenize | CPUs | rows/s (best) | seconds | load (1 min) |\n|---|---|---|---|---|")
    for c in cells:
        print(f"| {'yes' if c['tokenize'] else 'no'} | {c['cpus']} | {c['rows_per_s']:,.0f} | {c['seconds']} | "
              f"{c['load_1min']:.1f} |")
    print(f"scaling {min(args.cpus)} -> {max(args.cpus)} CPUs: {scaling}")


if __name__ == "__main__":
    main()
