"""One input record -> (prompt, chosen, rejected), or the reason it cannot be one (pure).

Three shapes of preference data are understood: plain pairs; HH-RLHF, whose chosen/rejected hold whole
conversations and whose prompt is their shared prefix up to the last assistant marker; and chat-message
lists, whose prompt is every message before the final assistant turn. Every failure is an `Issue` naming the
field, which the pipeline writes to the quarantine with the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray_crm.config import ColumnsConfig, SplitConfig

REASONS = {
    "malformed": "the record cannot be parsed (bad or too deeply nested JSON, wrong CSV field count, not an object)",
    "unreadable": "a Parquet or Arrow row that cannot be decoded (a damaged page) or has no Python value",
    "bad_file": "a file, or the rest of one, that cannot be read (a cut-off gzip stream, an unreadable Parquet "
                "footer or Arrow stream); prepare stops and names it",
    "undecodable": "text that is not valid UTF-8",
    "missing_field": "a required field is absent or null",
    "empty_field": "a required text is empty or blank",
    "not_a_string": "a text field holds another type",
    "bad_format": "an HH-RLHF or chat record whose structure does not give a prompt and two responses",
    "bad_split": "the split column holds something other than train/validation/test",
    "identical": "chosen == rejected",
    "duplicate": "the same (prompt, chosen, rejected) as an earlier row",
    "overlong": "longer than model.max_length tokens (with validation.on_overlong=quarantine)",
    "bad_z": "a spurious variable that cannot be measured for this pair",
}
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_MISSING = object()


@dataclass(frozen=True)
class Issue:
    reason: str  # a key of REASONS
    field: str | None
    detail: str


Pair = tuple[str, str, str]


def to_text(value: Any, field: str) -> str | Issue:
    """A text field's value, or why it is not usable text."""
    if value is _MISSING or value is None:
        return Issue("missing_field", field, f"field '{field}' is missing")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Issue("undecodable", field, f"field '{field}' is not UTF-8 (byte {exc.start})")
    if not isinstance(value, str):
        return Issue("not_a_string", field, f"field '{field}' is not a string (got {type(value).__name__})")
    if (bad := _SURROGATE.search(value)) is not None:
        return Issue("undecodable", field, f"field '{field}' is not UTF-8 (character {bad.start()})")
    return value


def as_text(value: Any, field: str) -> str | None | Issue:
    """A carried (keep / Z) column as text: strings as they are, other values as JSON, null as None."""
    if value is None or value is _MISSING:
        return None
    try:
        text = value if isinstance(value, (str, bytes)) else json.dumps(value, ensure_ascii=False, default=str)
    except RecursionError:  # json.loads read it a few stack frames higher up
        return Issue("malformed", field, f"field '{field}' is nested too deeply to copy")
    return to_text(text, field)


def split_hh(chosen: str, rejected: str, marker: str, field: str) -> Pair | Issue:
    """HH-RLHF: the prompt is the shared prefix up to and including the last shared assistant marker."""
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(marker, 0, shared)  # the last marker lying wholly inside the shared prefix
    if cut < 0:
        return Issue("bad_format", field, f"hh: chosen and rejected share no prefix ending in {marker!r}")
    end = cut + len(marker)
    return chosen[:end], chosen[end:].lstrip(), rejected[end:].lstrip()


def _messages(value: Any, field: str) -> list[tuple[str, str]] | Issue:
    if value is None:
        return Issue("missing_field", field, f"field '{field}' is missing")
    if not isinstance(value, list):
        return Issue("bad_format", field, f"chat: field '{field}' is not a list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            return Issue("bad_format", field, f"chat: {field}[{i}] is not a message object")
        role, content = to_text(msg.get("role", _MISSING), f"{field}[{i}].role"), to_text(
            msg.get("content", _MISSING), f"{field}[{i}].content")
        if isinstance(role, Issue) or isinstance(content, Issue):
            return role if isinstance(role, Issue) else content
        out.append((role, content))
    return out


def render(messages: list[tuple[str, str]]) -> str:
    """A prompt conversation as text: a lone user turn as itself, else 'Role: content' turns."""
    if len(messages) == 1 and messages[0][0] == "user":
        return messages[0][1]
    return "\n\n".join(f"{role.capitalize()}: {content}" for role, content in messages)


def _chat(record: Mapping[str, Any], cols: ColumnsConfig) -> Pair | Issue:
    chosen, rejected = _messages(record.get(cols.chosen), cols.chosen), _messages(record.get(cols.rejected), cols.rejected)
    for m in (chosen, rejected):
        if isinstance(m, Issue):
            return m
    prompt_value = record.get(cols.prompt)
    if prompt_value is None:
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            return Issue("bad_format", cols.rejected, "chat: chosen and rejected differ before their last message")
    else:
        prompt = _messages(prompt_value, cols.prompt) if isinstance(prompt_value, list) else to_text(
            prompt_value, cols.prompt)
        if isinstance(prompt, Issue):
            return prompt
        prompt = prompt if isinstance(prompt, list) else [("user", prompt)]
    replies = []
    for field, msgs in ((cols.chosen, chosen), (cols.rejected, rejected)):
        msgs = msgs[len(prompt):] if msgs[: len(prompt)] == prompt else msgs
        if len(msgs) != 1 or msgs[0][0] != "assistant":
            return Issue("bad_format", field, f"chat: expected one final assistant message after the prompt in '{field}'")
        replies.append(msgs[0][1])
    return render(prompt), replies[0], replies[1]


def to_pair(record: Mapping[str, Any], cols: ColumnsConfig) -> Pair | Issue:
    """(prompt, chosen, rejected) of one record, checked for missing, empty, non-text and identical fields."""
    chosen_value = record.get(cols.chosen, _MISSING)
    form = cols.format
    if form == "auto":
        form = "chat" if isinstance(chosen_value, list) else "pairs" if cols.prompt in record else "hh"
    if form == "chat":
        pair = _chat(record, cols)
    else:
        texts = [to_text(record.get(f, _MISSING), f) for f in ((cols.prompt,) if form == "pairs" else ()) + (
            cols.chosen, cols.rejected)]
        if issue := next((t for t in texts if isinstance(t, Issue)), None):
            return issue
        pair = tuple(texts) if form == "pairs" else split_hh(texts[0], texts[1], cols.hh_marker, cols.chosen)
    if isinstance(pair, Issue):
        return pair
    for field, text in zip((cols.prompt, cols.chosen, cols.rejected), pair):
        if not text.strip():
            return Issue("empty_field", field, f"field '{field}' is empty")
    if pair[1] == pair[2]:
        return Issue("identical", None, "chosen and rejected are the same text")
    return pair


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """A content hash: equal pairs get equal ids, which is how duplicates are found."""
    return hashlib.blake2b(f"{prompt}\x1f{chosen}\x1f{rejected}".encode(), digest_size=8).hexdigest()


def hash_split(key: str, cfg: SplitConfig) -> str:
    """Deterministic split of a prompt (or pair) by its hash and the configured shares."""
    digest = hashlib.blake2b(f"{cfg.seed}\x1f{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "test" if u < cfg.test else "validation" if u < cfg.test + cfg.validation else "train"


def parse_split(value: Any, field: str) -> str | Issue:
    split = _SPLIT_ALIASES.get(str(value).strip().lower()) if value is not None else None
    if split is None:
        return Issue("bad_split", field, f"field '{field}' is {value!r}, not one of train/validation/test")
    return split
