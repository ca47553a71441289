"""Step metrics to CSV and TensorBoard on rank 0 (ray.train.report carries only the eval-time metrics)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends rows to `<name>.csv` and scalars to TensorBoard.

    A row with a key no earlier row had (a statistic measured only on some steps, or a first step that
    measured less than the others) widens the file's header instead of losing the column.
    """

    def __init__(self, folder: Path, name: str):
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{name}.csv"
        self.name = name
        self._writer = SummaryWriter(str(folder / "tensorboard"))
        self._fields: list[str] | None = None
        if self.path.exists():
            with open(self.path) as fh:
                self._fields = next(csv.reader(fh), None)

    def drop_after(self, step: int) -> None:
        """Forget the rows logged after `step`: a run resumed from that step's checkpoint logs them again."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        kept = rows[:1] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerows(kept)

    def write(self, step: int, row: dict[str, Any]) -> None:
        row = {"step": step, **row}
        new = [key for key in row if key not in (self._fields or [])]
        if new:
            self._widen(new)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self._fields).writerow(row)
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                self._writer.add_scalar(f"{self.name}/{key}", value, step)
        self._writer.flush()

    def _widen(self, keys: list[str]) -> None:
        """Rewrite the file with `keys` appended to its header (earlier rows get empty cells)."""
        rows = []
        if self._fields is not None and self.path.exists():
            with open(self.path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        self._fields = [*(self._fields or []), *keys]
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, self._fields)
            writer.writeheader()
            writer.writerows(rows)
