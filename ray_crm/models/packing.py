"""Padding-free batches: whole sequences packed several to a row, positions restarting at each, so the linear
layers see no padding and attention stays inside each sequence. Plain torch: the one thing it knows of a model is
the keyword inputs transformers models take."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def pack_rows(lengths: Sequence[int], pack_tokens: int) -> list[list[int]]:
    """Sequence indices grouped into rows of at most `pack_tokens` tokens, first-fit by decreasing length (a
    longer sequence gets a row of its own); one sequence per row, in order, when `pack_tokens` is 0."""
    if not pack_tokens:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        row = next((r for r, room in enumerate(free) if lengths[i] <= room), None)
        if row is None:
            rows.append([])
            free.append(pack_tokens)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


@dataclass
class PackedSequences:
    """N sequences laid out in R rows of L tokens. `segment` says which sequence each token is (-1: padding);
    `row`, `start` and `length` say where sequence i sits."""

    input_ids: Tensor  # [R, L]
    position_ids: Tensor  # [R, L]: 0, 1, ... within each sequence; 0 on padding
    segment: Tensor  # [R, L]
    row: Tensor  # [N]
    start: Tensor  # [N]
    length: Tensor  # [N]
    token_type_ids: Tensor | None = None  # [R, L]

    @property
    def packed(self) -> bool:
        return len(self.row) > self.input_ids.shape[0]

    @property
    def first(self) -> tuple[Tensor, Tensor]:
        """(row, column) of each sequence's first token: where encoders pool."""
        return self.row, self.start

    @property
    def last(self) -> tuple[Tensor, Tensor]:
        """(row, column) of each sequence's last token: where decoders pool."""
        return self.row, self.start + self.length - 1

    def attention_mask(self, causal: bool, implementation: str, dtype: torch.dtype) -> Tensor:
        """[R, 1, L, L]: a token sees its own sequence only (and only earlier tokens if `causal`); padding sees
        padding, so no query row is empty (an empty row is NaN under sdpa). Boolean for sdpa and flex, additive
        (0 or the dtype's minimum) for eager attention."""
        seg = self.segment
        allowed = seg[:, :, None] == seg[:, None, :]
        if causal:
            allowed = allowed & torch.ones_like(allowed[0]).tril()
        allowed = allowed[:, None]
        if implementation in ("sdpa", "flex_attention"):
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def next_token_targets(self, starts: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """For each logit position t [R, L - 1], aligned with next-token log-probs: the sequence whose token t + 1
        is (-1: padding, or a sequence's first token, which no position of its own predicts), and whether that
        token is a response token (its position within the sequence >= the sequence's entry of `starts`)."""
        owner, position = self.segment[:, 1:], self.position_ids[:, 1:]
        sequence = torch.where(position >= 1, owner, -1)
        starts = torch.as_tensor(starts, device=owner.device)
        return sequence, (sequence >= 0) & (position >= starts[sequence.clamp(min=0)])

    def model_inputs(self, model, causal: bool) -> dict[str, Tensor]:
        """Keyword inputs of a transformers model (or a PEFT or DeepSpeed wrapper of one) for these rows."""
        inner = getattr(model, "module", model)
        mask = self.attention_mask(causal, inner.config._attn_implementation, next(inner.parameters()).dtype)
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs

    def to(self, device: torch.device | str) -> PackedSequences:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        return PackedSequences(**moved)


def pack_sequences(ids: Sequence[Sequence[int]], pad_id: int, pack_tokens: int,
                   token_types: Sequence[Sequence[int]] | None = None) -> PackedSequences:
    """Token lists -> a `PackedSequences` (rows of up to `pack_tokens` tokens; 0: one right-padded row each)."""
    layout = pack_rows([len(s) for s in ids], pack_tokens)
    width = max(sum(len(ids[i]) for i in row) for row in layout)
    shape = (len(layout), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    types = None if token_types is None else torch.zeros(shape, dtype=torch.long)
    row, start = torch.zeros(len(ids), dtype=torch.long), torch.zeros(len(ids), dtype=torch.long)
    for r, members in enumerate(layout):
        at = 0
        for i in members:
            n = len(ids[i])
            input_ids[r, at : at + n] = torch.as_tensor(ids[i], dtype=torch.long)
            position_ids[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = i
            if types is not None:
                types[r, at : at + n] = torch.as_tensor(token_types[i], dtype=torch.long)
            row[i], start[i] = r, at
            at += n
    length = torch.as_tensor([len(s) for s in ids], dtype=torch.long)
    return PackedSequences(input_ids, position_ids, segment, row, start, length, types)
