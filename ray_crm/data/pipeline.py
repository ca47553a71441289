"""`ray-crm prepare` on Ray Data: read -> normalize -> find duplicates -> measure Z and tokenize -> quarantine
-> fit bins on train -> bin -> write Parquet per split, audit and manifest.

Ray tasks do all per-row work (parse, validate, Z, tokenizer); the driver sees only small columns - pair ids to
find duplicates, split/reason/Z to count, fit the bins and audit - never texts or token ids. The data is
materialized twice: after parsing (so the duplicate set is known before the heavy pass and the rows can be
re-split into `block_rows` blocks for parallel work; one piece of an input file is one task, see
`ray_crm.data.readers`) and after measuring (so counting, quarantining and writing do not re-tokenize).

A run holds a lock on its output folder and writes into a temporary sibling that replaces the previous output
only once everything is written and the records read are all accounted for (kept + quarantined), so a failed
or killed run leaves the previous output as it was (`ray_crm.data.outdir`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.expressions import col

from ray_crm.config import Config, DataConfig
from ray_crm.data.audit import audit, write_audit
from ray_crm.data.binning import Binning, fit_binning
from ray_crm.data.blocks import SIDES, bin_block, measure_block, parse_file, z_arrays
from ray_crm.data.encode import load_encoder
from ray_crm.data.outdir import output_lock, staged_output
from ray_crm.data.pairs import SPLITS
from ray_crm.data.readers import RANGE_BYTES, InputFile, Piece, Scan, expand_inputs, scan
from ray_crm.runtime import init_ray

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
STAGING = "_splits"  # Ray writes all splits in one pass as STAGING/split=<name>/, then each is moved to <name>/
OUTPUTS = (*SPLITS, STAGING, QUARANTINE, MANIFEST, "audit.json", "audit.png", "inputs")
QUARANTINE_COLUMNS = ["source_file", "source_line", "reason", "field", "detail", "raw", "prompt", "chosen", "rejected"]


class PrepareError(RuntimeError):
    """Input that cannot become a training set: too many bad rows, no train pairs, no input, an unreadable file."""


def _scan(path: str, file: InputFile) -> Scan:
    with open(path, "rb") as source:
        return scan(source, file, RANGE_BYTES)


def _parse_batch(batch: dict[str, np.ndarray], pieces: list[tuple[str, Piece]], files: dict[str, InputFile],
                 cfg: DataConfig) -> Iterator[pa.Table]:
    """The task's pieces, read here rather than by `read_binary_files`, which holds a whole file in one row,
    un-gzips by extension itself and fails the whole job on a cut-off stream: the reader streams its piece, keeps
    the records before a cut and names the file."""
    for i in batch["piece"]:
        path, piece = pieces[i]
        with open(path, "rb") as source:
            yield from parse_file(source, files[path], cfg, piece)


def _collect(ds: ray.data.Dataset, columns: list[str]) -> pa.Table:
    """Small columns of every row, on the driver."""
    tables = ray.get(ds.select_columns(columns).to_arrow_refs())
    return pa.concat_tables(tables) if tables else pa.schema(
        [(n, t) for n, t in zip(ds.schema().names, ds.schema().types) if n in columns]).empty_table()


def find_duplicates(parsed: ray.data.Dataset, files: list[InputFile]) -> dict[tuple[int, int], str]:
    """(input index, line) of every repeat of an earlier (prompt, chosen, rejected) -> where it first occurs."""
    keys = _collect(parsed.filter(expr=col("reason").is_null()), ["pair_id", "source_index", "source_line"])
    keys = keys.sort_by([("pair_id", "ascending"), ("source_index", "ascending"), ("source_line", "ascending")])
    pid = keys["pair_id"].to_numpy(zero_copy_only=False)
    index, line = keys["source_index"].to_numpy(), keys["source_line"].to_numpy()
    repeat = np.r_[False, pid[1:] == pid[:-1]] if len(pid) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(pid))))
    return {(int(index[i]), int(line[i])): f"duplicate of {files[index[f]].path}:{line[f]}"
            for i, f in zip(np.flatnonzero(repeat), first[repeat])}


def _check_readable(parsed: ray.data.Dataset) -> None:
    """Stop at a file that cannot be read: how many records it held is unknown, so no bad-row fraction can
    account for it."""
    bad = _collect(parsed.filter(expr=col("reason") == "bad_file"), ["source_file", "source_line", "detail"])
    if bad.num_rows:
        where = "; ".join(f"{r['source_file']}:{r['source_line']}: {r['detail']}" for r in bad.to_pylist())
        raise PrepareError(f"{bad.num_rows} input file(s) cannot be read; fix or remove them from data.paths: {where}")


def _write_quarantine(measured: ray.data.Dataset, path: Path, bad: int) -> int:
    """Every bad row with its reason, field, file and line (streamed, so a large quarantine is fine; no pass
    over the data at all when the summary counted no bad row). Returns the number of rows written."""
    written = 0
    with path.open("w", encoding="utf-8") as fh:
        if bad:
            rows = measured.filter(expr=col("reason").is_not_null()).select_columns(QUARANTINE_COLUMNS)
            for batch in rows.iter_batches(batch_format="pyarrow", batch_size=4096):
                fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in batch.to_pylist())
                written += batch.num_rows
    return written


def _check_accounted(records_read: int, kept: int, quarantined: int) -> None:
    """Every record read is in a split or in the quarantine, once: counted from the files written, not from the
    table they were written from."""
    if records_read != kept + quarantined:
        raise PrepareError(f"{records_read} records were read but {kept} kept + {quarantined} quarantined = "
                           f"{kept + quarantined} were written; the output is not trusted")


def _check_bad_fraction(summary: pa.Table, bad: int, cfg: DataConfig, quarantine: Path) -> dict[str, int]:
    total = summary.num_rows
    if total == 0:
        raise PrepareError("the inputs hold no records")
    by_reason = {r["values"]: r["counts"] for r in pc.value_counts(summary["reason"].drop_null()).to_pylist()}
    if bad / total > cfg.validation.max_bad_fraction:
        with quarantine.open(encoding="utf-8") as fh:
            first = [json.loads(fh.readline()) for _ in range(min(bad, 3))]
        examples = "; ".join(f"{q['source_file']}:{q['source_line']}: {q['detail']}" for q in first)
        raise PrepareError(
            f"{bad} of {total} rows ({bad / total:.1%}) failed validation, more than "
            f"data.validation.max_bad_fraction={cfg.validation.max_bad_fraction}; by reason {by_reason}; "
            f"first: {examples}; every bad row is in {quarantine}"
        )
    return by_reason


def _z_pooled(table: pa.Table, names: list[str]) -> dict[str, np.ndarray]:
    zc, zr = z_arrays(table, names, "chosen"), z_arrays(table, names, "rejected")
    return {n: np.concatenate([zc[n], zr[n]]) for n in names}


def _split_stats(table: pa.Table, binning: Binning) -> dict[str, Any]:
    names = list(binning.names)
    bins = {s: binning.apply(z_arrays(table, names, s)) for s in SIDES}
    return {
        "pairs": table.num_rows,
        "truncated": int(pc.sum(table["truncated"]).as_py() or 0),
        "bins_chosen": np.bincount(bins["chosen"], minlength=binning.num_bins).tolist(),
        "bins_rejected": np.bincount(bins["rejected"], minlength=binning.num_bins).tolist(),
        "unseen": binning.unseen(_z_pooled(table, names)),
    }


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("ray-crm", "ray", "pyarrow", "numpy", "transformers", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _input_files(data: DataConfig) -> list[InputFile]:
    if not data.paths:
        raise PrepareError("no input: set data.paths (files, folders or globs) or data.vader")
    return expand_inputs(data.paths, data.format)


def _tokenizer(cfg: Config) -> dict[str, Any] | None:
    data = cfg.data
    if not (data.tokenize or any(s.kind == "length" and s.unit == "tokens" for s in data.spurious)):
        return None
    from ray_crm.assets import resolve_model

    path = str(resolve_model(cfg.model.name))
    enc = load_encoder(path, cfg.model.max_length, data.template)
    return {"name": cfg.model.name, "path": path, "class": type(enc.tokenizer).__name__, "mode": enc.mode,
            "max_length": cfg.model.max_length, "token_type_ids": enc.type_ids, "input_ids": data.tokenize}


def _inputs(cfg: Config, out: Path, work: Path) -> dict[str, InputFile]:
    """Input files by the path they are read from, each named by where it stays (VADER pairs are built into the
    new output). An input inside `out` is refused: the whole folder is replaced."""
    data = cfg.data
    if data.vader:
        from ray_crm.data.vader import write_pairs

        built = write_pairs(data.vader, work / "inputs" / "vader_pairs.parquet")
        (file,) = expand_inputs([str(built)])
        return {file.path: replace(file, path=str(out / "inputs" / built.name))}
    files = _input_files(data)
    if clash := next((f.path for f in files if Path(f.path).is_relative_to(out)), None):
        raise PrepareError(f"input {clash} lies in the output folder {out}, which prepare replaces; choose another "
                           "data.output_dir")
    return {f.path: f for f in files}


class _Clock:
    """Wall time of each phase, kept in the manifest: it shows what scales with CPUs and what is serial."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


def run_prepare(cfg: Config) -> dict[str, Any]:
    """The stage: writes <out>/{train,validation,test}/ Parquet, quarantine.jsonl, audit.*, manifest.json.

    Under the lock of <out>, into a temporary sibling (.<name>.tmp) that replaces <out> only if the stage
    succeeds; a failed run's outputs (its quarantine) stay in that sibling until the next run.
    """
    out = cfg.prepared_dir()
    with output_lock(out), staged_output(out, OUTPUTS) as work:
        return _prepare(cfg, out, work)


def _prepare(cfg: Config, out: Path, work: Path) -> dict[str, Any]:
    """The stage's work, written into `work`; paths recorded in the outputs name `out`, where they will be."""
    data = cfg.data
    clock = _Clock()
    files = _inputs(cfg, out, work)
    tokenizer = _tokenizer(cfg)
    init_ray(cfg.ray)
    clock.lap("start")  # inputs, tokenizer, Ray
    scans = {path: _scan(path, f) for path, f in files.items()}
    clock.lap("scan_inputs")  # size, hash and pieces of every input, in one pass over its bytes

    pieces = [(path, piece) for path, s in scans.items() for piece in s.pieces]
    tasks = ray.data.from_items([{"piece": i} for i in range(len(pieces))], override_num_blocks=len(pieces))
    parsed = tasks.map_batches(
        _parse_batch, batch_size=1, batch_format="numpy", fn_kwargs={"pieces": pieces, "files": files, "cfg": data}
    ).materialize()
    records_read = parsed.count()  # parse_file gives one row per record each piece was counted to hold
    _check_readable(parsed)
    clock.lap("read_validate")
    duplicates = find_duplicates(parsed, list(files.values())) if data.validation.deduplicate else {}
    clock.lap("duplicates")
    measured = parsed.repartition(max(1, math.ceil(records_read / data.block_rows))).map_batches(
        measure_block, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"cfg": data, "tokenizer": tokenizer and tokenizer["path"], "max_length": cfg.model.max_length,
                   "duplicates": duplicates},
    ).materialize()
    clock.lap("z_tokenize")

    names = [s.name for s in data.spurious]
    z_columns = [f"z_{n}_{side}" for side in SIDES for n in names]
    summary = _collect(measured, ["split", "reason", "truncated", *z_columns])
    quarantine = work / QUARANTINE
    bad = int(pc.sum(pc.is_valid(summary["reason"])).as_py() or 0)
    quarantined = _write_quarantine(measured, quarantine, bad)
    by_reason = _check_bad_fraction(summary, bad, data, quarantine)
    clock.lap("quarantine")

    good = summary.filter(pc.is_null(summary["reason"]))
    per_split = {s: good.filter(pc.equal(good["split"], s)) for s in SPLITS}
    if per_split["train"].num_rows == 0:
        raise PrepareError("no valid train pairs: the bins are fitted on the train split")
    binning = fit_binning(_z_pooled(per_split["train"], names), {s.name: s.continuous for s in data.spurious},
                          {s.name: s.bins for s in data.spurious}, data.binning.min_count)
    splits = {s: _split_stats(t, binning) for s, t in per_split.items()}
    clock.lap("fit_bins")

    measured.filter(expr=col("reason").is_null()).map_batches(
        bin_block, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"binning": binning.to_dict(), "stratify_on": data.binning.stratify_on},
    ).write_parquet(str(work / STAGING), partition_cols=["split"])
    for split in SPLITS:
        if (work / STAGING / f"split={split}").is_dir():
            (work / STAGING / f"split={split}").rename(work / split)
    shutil.rmtree(work / STAGING)
    kept = sum(pads.dataset(work / s, format="parquet").count_rows() for s in SPLITS if (work / s).is_dir())
    _check_accounted(records_read, kept, quarantined)
    clock.lap("bin_write")

    train_pooled = np.add(splits["train"]["bins_chosen"], splits["train"]["bins_rejected"])
    small = [{"bin": int(b), "label": binning.label(int(b)), "responses": int(train_pooled[b])}
             for b in np.flatnonzero((train_pooled > 0) & (train_pooled < data.binning.min_count))]
    if small:
        print(f"prepare: {len(small)} joint bins hold fewer than {data.binning.min_count} train responses "
              f"(listed in the manifest under small_bins)", flush=True)

    train = per_split["train"]
    zc, zr = z_arrays(train, names, "chosen"), z_arrays(train, names, "rejected")
    report = audit(zc, zr, binning.apply_each(zc), binning.apply_each(zr),
                   dict(zip(names, binning.sizes)), {s.name: s.continuous for s in data.spurious})
    audit_paths = {kind: str(out / Path(p).name) for kind, p in write_audit(report, zc, zr, work).items()}
    clock.lap("audit")

    inputs = [{"path": f.path, "format": f.format, "split": f.split, "bytes": scans[read].size,
               "sha256": scans[read].sha256, "pieces": len(scans[read].pieces)} for read, f in files.items()]
    manifest = {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "num_bins": binning.num_bins,
        "num_strata": binning.num_bins ** 2 if data.binning.stratify_on == "both" else binning.num_bins,
        "binning": binning.to_dict(),
        "bin_labels": [binning.label(b) for b in range(binning.num_bins)],
        "spurious": [s.model_dump(mode="json") for s in data.spurious],
        "stratify_on": data.binning.stratify_on,
        "rows": {"records_read": records_read, "kept": kept, "quarantined": quarantined},
        "splits": splits,
        "small_bins": small,
        "empty_bins": int(np.sum(train_pooled == 0)),
        "quarantine": {"count": quarantined, "path": str(out / QUARANTINE), "by_reason": by_reason},
        "duplicates": len(duplicates),
        "tokenizer": tokenizer,
        "columns": pq.ParquetDataset(work / "train").schema.names,
        "inputs": inputs,
        "audit": audit_paths,
        "versions": _versions(),
        "data_config": data.model_dump(mode="json"),
        "stage_seconds": clock.seconds,
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"output_dir": str(out), "manifest": str(out / MANIFEST), "pairs": {s: v["pairs"] for s, v in splits.items()},
            "quarantined": quarantined, "num_bins": binning.num_bins,
            "audit": {n: r["signal"] for n, r in report.items()}}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """What identifies one `prepare` run's output: a hash of its whole manifest (inputs, settings, counts,
    creation time), so a re-prepared folder never passes for the one a model or cache was made from."""
    return hashlib.sha1(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_manifest(stage_dir: str | Path) -> dict[str, Any]:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prepared data here; run `ray-crm prepare` first")
    return json.loads(path.read_text())


def check_prepared_for(cfg: Config, manifest: dict[str, Any], stage_dir: str | Path) -> None:
    """Refuse prepared data whose bins or tokenizer differ from what `cfg` sets: the trainer reads the bins
    fitted at prepare time, so `data.spurious.0.bins=3` on prepared 10-bin data would silently train on 10."""
    made = manifest.get("data_config") or {}
    want = cfg.data.model_dump(mode="json")
    differ = [f"data.{key}" for key in ("spurious", "binning") if key in made and made[key] != want[key]]
    if (manifest.get("tokenizer") or {}).get("name", cfg.model.name) != cfg.model.name:
        differ.append("model.name")
    if differ:
        raise ValueError(f"{stage_dir} was prepared with other {', '.join(differ)} than this config sets: run "
                         "`ray-crm prepare` with this config (or set data.output_dir to a folder of its own)")


def _split_dir(stage_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    path = Path(stage_dir) / split
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: split '{split}' has no pairs (see {Path(stage_dir) / MANIFEST})")
    return path


def read_prepared(stage_dir: str | Path, split: str) -> ray.data.Dataset:
    """A prepared split as a Ray Dataset (row order on disk carries no meaning)."""
    return ray.data.read_parquet(str(_split_dir(stage_dir, split)))


def read_prepared_table(stage_dir: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """A prepared split in memory, in its canonical order (by pair_id), for index-based samplers."""
    cols = None if columns is None else list(dict.fromkeys(["pair_id", *columns]))
    return pq.read_table(_split_dir(stage_dir, split), columns=cols).sort_by("pair_id")
