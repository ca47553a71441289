"""Throughput of `ray-crm prepare`: two benchmarks, each kept under its own key of benchmarks/results/prepare.json.

    python benchmarks/bench_prepare.py scaling --rounds 2      # issue #3: with and without tokenization, 1 and 2 CPUs
    python benchmarks/bench_prepare.py single-file --gb 1      # one >= 1 GiB JSONL file against the same rows in shards

Input: preference pairs built from the real VADER sentences (`ray-crm assets` first).
- scaling: --pairs (default 100,000) pairs as 4 JSONL shards, as real preference sets come. With tokenization:
  all-MiniLM-L6-v2's WordPiece tokenizer, (prompt, response) text pairs, max length 128, length Z in tokens;
  without: no tokenizer loaded at all, length Z in words.
- single-file: 100,000 pairs repeated (each repeat's prompts numbered, so no row is a duplicate) until one JSONL
  file holds --gb GiB, and the same rows dealt into --shards files; no tokenization. The question is whether one
  big file is read as fast, and in as little memory per worker, as its shards: `prepare` cuts it into byte ranges
  (`ray_crm.data.readers.RANGE_BYTES`) read by parallel tasks in bounded memory.
The whole stage is timed (read + validate + duplicates + Z + (tokenize) + bins + audit + Parquet + manifest) and
its per-phase times kept. Each cell runs in a fresh process with its own local Ray cluster of --cpus CPUs: a
warm-up prepare of 2,000 pairs (Ray Data's worker processes start and import), then --rounds timed runs (best in
wall time reported; single-file takes the shards and the single file in turn, in one cell). Meanwhile a thread samples the cell's Ray worker processes every 0.1 s: peak RSS, peak RSS
less shared pages (the object store's pages a worker maps count as shared), which is how Ray's memory monitor
counts a worker, and the CPU seconds they used, over the whole run and up to the end of the read stage. The
machine may be shared: the 1-minute load average before each run is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from importlib.metadata import version
from pathlib import Path
from typing import Self

RESULTS = Path(__file__).parent / "results" / "prepare.json"
SHARDS = 4
BASE_PAIRS = 100_000
WARMUP_PAIRS = 2000
MB = 1 << 20


def vader_rows(pairs: int) -> list[dict]:
    import pyarrow.parquet as pq

    from ray_crm.assets import asset_dir
    from ray_crm.data.vader import build_pairs

    table = build_pairs(pq.read_table(asset_dir("vader") / "vader_sentences.parquet"), pairs, seed=0)
    return table.select(["prompt", "chosen", "rejected", "source"]).to_pylist()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_scaling_inputs(pairs: int, root: Path) -> list[str]:
    """VADER pairs as JSONL shards."""
    rows = vader_rows(pairs)
    return [write_jsonl(root / f"pairs-{i}.jsonl", rows[i::SHARDS]) for i in range(SHARDS)]


def write_single_file_inputs(gib: float, shards: int, root: Path) -> tuple[str, list[str], int]:
    """One JSONL file of at least `gib` GiB and the same lines dealt round-robin into `shards` files, streamed."""
    rows, target, written, n = vader_rows(BASE_PAIRS), int(gib * (1 << 30)), 0, 0
    single, parts = root / "single.jsonl", [root / f"shard-{i}.jsonl" for i in range(shards)]
    with ExitStack() as stack:
        one = stack.enter_context(single.open("wb"))
        outs = [stack.enter_context(p.open("wb")) for p in parts]
        while written < target:
            row = rows[n % len(rows)]
            line = json.dumps({**row, "prompt": f"{row['prompt']} #{n // len(rows)}"}).encode() + b"\n"
            one.write(line)
            outs[n % shards].write(line)
            written, n = written + len(line), n + 1
    return str(single), [str(p) for p in parts], written


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


class Workers:
    """Peak memory and CPU time of this process's Ray workers (its cluster's, not another's on the same
    machine), sampled. CPU seconds tell what wall time cannot on a shared machine: the work done."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int, float]] = []  # (time, largest RSS less shared, largest RSS, CPU s)
        self._cpu: dict[int, float] = {}  # by worker pid: user + system seconds, as last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            private = rss = 0
            for proc in me.children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())
                    if title.startswith("ray::") and "Agent" not in title:  # a worker, not a node's agent
                        mem, cpu = proc.memory_info(), proc.cpu_times()
                        private, rss = max(private, mem.rss - mem.shared), max(rss, mem.rss)
                        self._cpu[proc.pid] = cpu.user + cpu.system
                except psutil.Error:  # it ended meanwhile
                    continue
            self.samples.append((time.perf_counter(), private, rss, sum(self._cpu.values())))
            if self._stop.wait(0.1):
                return

    def peak_mb(self, until: float = float("inf")) -> dict[str, float]:
        seen = [s for s in self.samples if s[0] <= until]
        return {"private": round(max(s[1] for s in seen) / MB, 1), "rss": round(max(s[2] for s in seen) / MB, 1)}

    def cpu_s(self, until: float = float("inf")) -> float:
        """Worker CPU seconds from the first sample to the last one before `until`."""
        return round([s for s in self.samples if s[0] <= until][-1][3] - self.samples[0][3], 2)


def timed_run(paths: list[str], out: Path, tokenize: bool) -> dict:
    from ray_crm.data.pipeline import run_prepare

    load = os.getloadavg()[0]
    with Workers() as workers:
        start = time.perf_counter()
        result = run_prepare(config(paths, out, tokenize))
        seconds = time.perf_counter() - start
    rows = sum(result["pairs"].values()) + result["quarantined"]
    stages = json.loads(Path(result["manifest"]).read_text())["stage_seconds"]
    read_end = start + stages["start"] + stages["scan_inputs"] + stages["read_validate"]
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1), "load_1min": load,
            "read_rows_per_s": round(rows / stages["read_validate"], 1), "read_worker_cpu_s": workers.cpu_s(read_end),
            "worker_cpu_s": workers.cpu_s(), "peak_worker_mb": workers.peak_mb(),
            "peak_worker_mb_read": workers.peak_mb(read_end), "stage_seconds": stages}


def run_cell(spec: dict) -> dict:
    """One cell, inside its own process: start Ray, warm up, time `rounds` full runs of each input set, taking
    the sets in turn (so a change in the machine's load is shared between them)."""
    import resource

    from ray_crm.config import RayConfig
    from ray_crm.data.pipeline import run_prepare
    from ray_crm.runtime import init_ray

    start = time.perf_counter()
    init_ray(RayConfig(num_cpus=spec["cpus"]))
    ray_start = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        warm = write_jsonl(Path(tmp) / "warmup.jsonl", vader_rows(WARMUP_PAIRS))
        start = time.perf_counter()
        run_prepare(config([warm], Path(tmp) / "warm", spec["tokenize"]))
        warmup = time.perf_counter() - start
        runs: dict[str, list[dict]] = {name: [] for name in spec["inputs"]}
        for _ in range(spec["rounds"]):
            for name, paths in spec["inputs"].items():
                runs[name].append(timed_run(paths, Path(tmp) / "full", spec["tokenize"]))
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    common = {"cpus": spec["cpus"], "tokenize": spec["tokenize"], "ray_start_s": round(ray_start, 2),
              "warmup_s": round(warmup, 2), "driver_peak_rss_mb": round(driver_mb, 1)}
    return {name: {**common, "runs": r, **max(r, key=lambda run: run["rows_per_s"])} for name, r in runs.items()}


def cell(workdir: str, **spec) -> dict:
    """`run_cell` in a fresh process (its own Ray cluster)."""
    result_file = Path(workdir) / "cell.json"
    subprocess.run([sys.executable, __file__, "--cell", json.dumps({**spec, "out": str(result_file)})], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(result_file.read_text())


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.machine())
    return {"cpu": model, "nproc": os.cpu_count(), "python": platform.python_version(), "ray": version("ray"),
            "transformers": version("transformers"), "tokenizers": version("tokenizers")}


def scaling(args: argparse.Namespace) -> dict:
    cells = []
    with tempfile.TemporaryDirectory() as workdir:
        paths = write_scaling_inputs(args.pairs, Path(workdir))
        for tokenize in (False, True):
            for cpus in args.cpus:
                cells.append(cell(workdir, cpus=cpus, tokenize=tokenize, inputs={"shards": paths},
                                  rounds=args.rounds)["shards"])
                print(f"cpus={cpus} tokenize={tokenize}: {cells[-1]['rows_per_s']} rows/s", flush=True)
    by = {(c["cpus"], c["tokenize"]): c["rows_per_s"] for c in cells}
    ratio = {("tokenize" if t else "no_tokenize"): round(by[(max(args.cpus), t)] / by[(min(args.cpus), t)], 2)
             for t in (False, True) if len(args.cpus) > 1}
    print("| tokenize | CPUs | rows/s (best) | seconds | load (1 min) |\n|---|---|---|---|---|")
    for c in cells:
        print(f"| {'yes' if c['tokenize'] else 'no'} | {c['cpus']} | {c['rows_per_s']:,.0f} | {c['seconds']} | "
              f"{c['load_1min']:.1f} |")
    print(f"scaling {min(args.cpus)} -> {max(args.cpus)} CPUs: {ratio}")
    return {"pairs": args.pairs, "shards": SHARDS, "machine": machine(), "cells": cells, "scaling": ratio}


def single_file(args: argparse.Namespace) -> dict:
    from ray_crm.data.readers import RANGE_BYTES

    with tempfile.TemporaryDirectory() as workdir:
        single, shards, size = write_single_file_inputs(args.gb, args.shards, Path(workdir))
        cells = cell(workdir, cpus=args.cpus, tokenize=False, inputs={"shards": shards, "single": [single]},
                     rounds=args.rounds)
    ratio = {k: round(cells["single"][k] / cells["shards"][k], 2) for k in ("rows_per_s", "read_rows_per_s")}
    print("| input | rows/s | seconds | read s | read rows/s | read worker CPU s | peak worker MB, RSS less shared "
          "(read / run) | peak worker RSS MB | load |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layout, c in cells.items():
        print(f"| {layout} | {c['rows_per_s']:,.0f} | {c['seconds']} | {c['stage_seconds']['read_validate']:.1f} | "
              f"{c['read_rows_per_s']:,.0f} | {c['read_worker_cpu_s']} | {c['peak_worker_mb_read']['private']:.0f} / "
              f"{c['peak_worker_mb']['private']:.0f} | {c['peak_worker_mb']['rss']:.0f} | {c['load_1min']:.1f} |")
    print(f"single file / {args.shards} shards: {ratio}")
    return {"gib": args.gb, "bytes": size, "shards": args.shards, "range_bytes": RANGE_BYTES, "cpus": args.cpus,
            "machine": machine(), "cells": cells,
            "single_over_shards": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: a JSON spec for run_cell
    modes = parser.add_subparsers(dest="mode")
    one = modes.add_parser("scaling", help="issue #3: rows/s with and without tokenization, at 1 and 2 CPUs")
    one.add_argument("--pairs", type=int, default=100_000)
    one.add_argument("--rounds", type=int, default=2)
    one.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    big = modes.add_parser("single-file", help="one large JSONL file against the same rows in shards")
    big.add_argument("--gb", type=float, default=1.0, help="size of the single file in GiB")
    big.add_argument("--shards", type=int, default=SHARDS)
    big.add_argument("--rounds", type=int, default=2)
    big.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    if args.cell:
        spec = json.loads(args.cell)
        Path(spec["out"]).write_text(json.dumps(run_cell(spec)))
        return
    if args.mode is None:
        parser.error("choose a benchmark: scaling or single-file")
    report = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    report[args.mode.replace("-", "_")] = scaling(args) if args.mode == "scaling" else single_file(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
