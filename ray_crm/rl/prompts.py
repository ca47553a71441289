"""The RL prompts: a column of JSONL / CSV / Parquet files, or the VADER task's prompts by default.

Read with the same readers as preference data (`ray_crm.data.readers`), so a bad line is reported with its
file and line. Bad rows (unreadable, no prompt, an empty or non-text prompt) go to a quarantine file with the
reason; the run fails only if no prompt is left.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray_crm.data.pairs import Issue
from ray_crm.data.readers import expand_inputs, iter_records
from ray_crm.data.vader import PROMPTS


def load_prompts(paths: list[str], column: str, quarantine: Path) -> list[str]:
    """Every good prompt in file order; bad rows are written to `quarantine` (JSON lines) with the reason."""
    if not paths:
        return list(PROMPTS.values())
    prompts, bad = [], []
    for file in expand_inputs(paths):
        with open(file.path, "rb") as source:
            records = list(iter_records(source, file))
        for line, record, raw in records:
            where = {"file": file.path, "line": line, "field": column}
            if isinstance(record, Issue):
                bad.append({**where, "reason": record.reason, "detail": record.detail, "raw": raw})
            elif not isinstance(value := record.get(column), str) or not value.strip():
                reason = "missing" if value is None else "empty" if isinstance(value, str) else "not_text"
                bad.append({**where, "reason": reason, "detail": f"{column}={value!r}", "raw": raw})
            else:
                prompts.append(value)
    if bad:
        quarantine.parent.mkdir(parents=True, exist_ok=True)
        quarantine.write_text("".join(json.dumps(b, default=str) + "\n" for b in bad))
    if not prompts:
        first = bad[0] if bad else {"file": paths, "line": "-", "reason": "no rows"}
        raise ValueError(f"rl.prompts: no usable prompt (first problem: {first['file']} line {first['line']} "
                         f"field '{column}': {first['reason']}); bad rows in {quarantine}")
    return prompts
