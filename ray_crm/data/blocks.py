"""The per-block work of the prepare pipeline, as plain pyarrow functions that Ray Data runs in its tasks.

1. `parse_file`: one piece of an input file -> normalized rows (pair fields, provenance, split, and the issue
   if any).
2. `measure_block`: marks duplicates, measures Z and tokenizes the good rows; rows that fail turn bad here.
3. `bin_block`: the fitted bins of each response and the sampler's stratum; output columns only.
A bad row keeps flowing with its `reason`/`field`/`detail` set, so nothing is dropped before the quarantine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_crm.config import DataConfig
from ray_crm.data.binning import Binning
from ray_crm.data.encode import PairEncoder, load_encoder
from ray_crm.data.pairs import Issue, as_text, hash_split, pair_id, parse_split, to_pair
from ray_crm.data.readers import WHOLE, InputFile, Piece, iter_records
from ray_crm.data.spurious import arrow_type, missing
from ray_crm.data.zbins import ResponseBinner

RAW_CHARS = 2000  # of a bad record's text kept in the quarantine
ISSUE_COLUMNS = ("reason", "field", "detail", "raw")
SIDES = ("chosen", "rejected")


def carried_columns(data: DataConfig) -> list[str]:
    """Input columns copied along: `columns.keep` and the columns the Zs read, in a stable order."""
    names = list(data.columns.keep) + [c for s in data.spurious for c in s.input_columns()]
    return list(dict.fromkeys(names))


def normalized_schema(carried: list[str]) -> pa.Schema:
    text = [("pair_id", pa.string()), ("split", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
            ("rejected", pa.string())]
    provenance = [("source_file", pa.string()), ("source_line", pa.int64()), ("source_index", pa.int32())]
    issue = [(c, pa.string()) for c in ISSUE_COLUMNS]
    return pa.schema(text + provenance + issue + [(c, pa.string()) for c in carried])


def _pair_row(record: dict[str, Any] | Issue, file: InputFile, data: DataConfig,
              carried: list[str]) -> dict[str, Any] | Issue:
    if isinstance(record, Issue):
        return record
    pair = to_pair(record, data.columns)
    if isinstance(pair, Issue):
        return pair
    values = {c: as_text(record.get(c), c) for c in carried}
    if bad := next((v for v in values.values() if isinstance(v, Issue)), None):
        return bad
    split = file.split
    if split is None and data.columns.split:
        split = parse_split(record.get(data.columns.split), data.columns.split)
        if isinstance(split, Issue):
            return split
    pid = pair_id(*pair)
    split = split or hash_split(pair[0] if data.split.by == "prompt" else pid, data.split)
    return dict(zip(("prompt", "chosen", "rejected"), pair), pair_id=pid, split=split, **values)


def _normalize(record: dict[str, Any] | Issue, raw: str | None, file: InputFile, data: DataConfig,
               carried: list[str]) -> dict[str, Any]:
    row = _pair_row(record, file, data, carried)
    if isinstance(row, Issue):
        text = raw if raw is not None else json.dumps(record, default=str) if isinstance(record, dict) else None
        row = {"reason": row.reason, "field": row.field, "detail": row.detail,
               "raw": None if text is None else text[:RAW_CHARS]}
    return row


def parse_file(source: BinaryIO, file: InputFile, cfg: DataConfig, piece: Piece = WHOLE) -> Iterator[pa.Table]:
    """Normalized rows of one piece of an input file, in tables of at most `cfg.block_rows` rows; one row per
    record the reader counted (so the pipeline's row count is the number of records read)."""
    carried = carried_columns(cfg)
    schema = normalized_schema(carried)
    rows: list[dict[str, Any]] = []
    records, read = iter_records(source, file, piece), 0
    for line, record, raw in records:
        read += 1
        row = _normalize(record, raw, file, cfg, carried)
        row.update(source_file=file.path, source_line=line, source_index=file.index)
        rows.append(row)
        if len(rows) >= cfg.block_rows:
            yield pa.Table.from_pylist(rows, schema)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema)
    if read != records.count:
        raise RuntimeError(f"{file.path}: the reader counted {records.count} records but gave {read}")


def _with_issues(table: pa.Table, issues: Mapping[int, Issue]) -> pa.Table:
    """Set reason/field/detail of the rows at these positions."""
    if not issues:
        return table
    for col, attr in (("reason", "reason"), ("field", "field"), ("detail", "detail")):
        values = table[col].to_pylist()
        for i, issue in issues.items():
            values[i] = getattr(issue, attr)
        table = table.set_column(table.schema.get_field_index(col), col, pa.array(values, pa.string()))
    return table


def measured_types(cfg: DataConfig, encoder: PairEncoder | None) -> dict[str, pa.DataType]:
    """Columns `measure_block` adds: token ids only when `cfg.tokenize` and there is an encoder; token type ids
    for text pairs that have them; where each response starts for chat texts (what DPO learns from)."""
    types = {f"z_{s.name}_{side}": arrow_type(s) for side in SIDES for s in cfg.spurious}
    if cfg.tokenize and encoder is not None:
        types.update({f"{side}_input_ids": pa.list_(pa.int32()) for side in SIDES})
        if encoder.type_ids:
            types.update({f"{side}_token_type_ids": pa.list_(pa.int8()) for side in SIDES})
        if encoder.mode == "chat":
            types.update({f"{side}_response_start": pa.int32() for side in SIDES})
    return types | {"truncated": pa.bool_()}


def _measure(good: pa.Table, cfg: DataConfig, encoder: PairEncoder | None,
             max_length: int) -> tuple[dict[str, list], dict[int, Issue]]:
    """Z and token ids of the good rows, and the rows that turn out bad."""
    prompts, texts = good["prompt"].to_pylist(), {s: good[s].to_pylist() for s in SIDES}
    columns = {c: good[c].to_pylist() for c in carried_columns(cfg)}
    issues: dict[int, Issue] = {}
    new: dict[str, list] = {}
    truncated = np.zeros(good.num_rows, bool)
    if encoder is not None:
        encoder.forget()
    if cfg.tokenize and encoder is not None:  # first: the length Z reuses the pairs' response token counts
        for side in SIDES:
            enc = encoder.encode(prompts, texts[side])
            new[f"{side}_input_ids"] = enc.input_ids
            if enc.token_type_ids is not None:
                new[f"{side}_token_type_ids"] = enc.token_type_ids
            if enc.response_starts is not None:
                new[f"{side}_response_start"] = enc.response_starts
            over = np.asarray(enc.lengths) > max_length
            truncated |= over
            if cfg.validation.on_overlong == "quarantine":
                for i in np.flatnonzero(over):
                    issues.setdefault(int(i), Issue("overlong", side, f"{side}: {enc.lengths[i]} tokens > "
                                                                      f"model.max_length {max_length}"))
    new["truncated"] = truncated.tolist()
    binner = ResponseBinner(cfg.spurious, count_tokens=encoder.count_tokens if encoder else None)
    for side in SIDES:
        z = binner.values(prompts, texts[side], side, columns)
        for spec in cfg.spurious:
            field = spec.column or getattr(spec, f"{side}_column")
            why = f"column '{field}' is empty or not a number" if field else "the extractor gave no value"
            for i in np.flatnonzero(missing(z[spec.name])):
                issues.setdefault(int(i), Issue("bad_z", field, f"Z '{spec.name}' of the {side} response: {why}"))
            new[f"z_{spec.name}_{side}"] = z[spec.name].tolist()
    return new, issues


def measure_block(
    table: pa.Table,
    cfg: DataConfig,
    tokenizer: str | None,
    max_length: int,
    duplicates: Mapping[tuple[int, int], str],
) -> pa.Table:
    """Z values and token ids of the good rows; new issues: duplicate, bad_z, overlong."""
    keys = zip(table["source_index"].to_pylist(), table["source_line"].to_pylist())
    table = _with_issues(table, {i: Issue("duplicate", None, duplicates[k]) for i, k in enumerate(keys)
                                 if k in duplicates})
    good_mask = pc.is_null(table["reason"])
    good, bad = table.filter(good_mask), table.filter(pc.invert(good_mask))
    encoder = load_encoder(tokenizer, max_length, cfg.template) if tokenizer else None
    types = measured_types(cfg, encoder)
    new, issues = _measure(good, cfg, encoder, max_length) if good.num_rows else ({n: [] for n in types}, {})
    good = _with_issues(good, issues)
    for name, typ in types.items():
        good = good.append_column(name, pa.array(new[name], typ))
        bad = bad.append_column(name, pa.nulls(bad.num_rows, typ))
    return pa.concat_tables([good, bad])


def z_arrays(table: pa.Table, names: list[str], side: str) -> dict[str, np.ndarray]:
    return {n: table[f"z_{n}_{side}"].to_numpy(zero_copy_only=False) for n in names}


def stratum(bin_chosen: np.ndarray, bin_rejected: np.ndarray, num_bins: int, on: str) -> np.ndarray:
    if on == "chosen":
        return bin_chosen
    if on == "rejected":
        return bin_rejected
    return bin_chosen * num_bins + bin_rejected


def bin_block(table: pa.Table, binning: Mapping[str, Any], stratify_on: str) -> pa.Table:
    """Bins of both responses and the stratum, on good rows; drops the working columns."""
    fitted = Binning.from_dict(binning)
    names = list(fitted.names)
    bins = {side: fitted.apply(z_arrays(table, names, side)) for side in SIDES}
    table = table.drop_columns([*ISSUE_COLUMNS, "source_index"])
    table = table.append_column("bin_chosen", pa.array(bins["chosen"], pa.int64()))
    table = table.append_column("bin_rejected", pa.array(bins["rejected"], pa.int64()))
    return table.append_column("stratum", pa.array(stratum(bins["chosen"], bins["rejected"], fitted.num_bins,
                                                           stratify_on), pa.int64()))
