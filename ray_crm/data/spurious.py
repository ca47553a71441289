"""Extractors of spurious variables Z: pure functions from a batch of texts to one Z value per response.

Every kind is registered once here and `extract` is the only road from a `SpuriousConfig` to Z values, so a
response gets the same Z whether it is a training pair, a test pair or a PPO rollout. A value that cannot be
measured (a missing column value, an unparsable number) comes back as None/NaN; callers quarantine it.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from ray_crm.config import SpuriousConfig

CountTokens = Callable[[list[str]], Sequence[int]]
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Side:
    """What an extractor sees for one side (chosen or rejected) of a batch of pairs."""

    texts: list[str]  # the text Z is measured on, per `SpuriousConfig.on`
    columns: Mapping[str, Sequence[str | None]]  # carried input columns, as text
    side: Literal["chosen", "rejected"]
    count_tokens: CountTokens | None = None


Extractor = Callable[[SpuriousConfig, Side], np.ndarray]
EXTRACTORS: dict[str, Extractor] = {}


def register(kind: str) -> Callable[[Extractor], Extractor]:
    def add(fn: Extractor) -> Extractor:
        EXTRACTORS[kind] = fn
        return fn

    return add


def arrow_type(spec: SpuriousConfig) -> pa.DataType:
    """The column type of a Z: counts and flags as int64, other numbers float64, categories as text."""
    if spec.kind in ("length", "sycophancy"):
        return pa.int64()
    return pa.float64() if spec.numeric else pa.string()


def texts_for(spec: SpuriousConfig, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
    if spec.on == "prompt":
        return list(prompts)
    if spec.on == "prompt_response":
        return [f"{p}\n{r}" for p, r in zip(prompts, responses)]
    return list(responses)


def extract(
    spec: SpuriousConfig,
    prompts: Sequence[str],
    responses: Sequence[str],
    side: Literal["chosen", "rejected"],
    columns: Mapping[str, Sequence[str | None]] | None = None,
    count_tokens: CountTokens | None = None,
) -> np.ndarray:
    """Z of each response (one per element of `responses`)."""
    values = EXTRACTORS[spec.kind](spec, Side(texts_for(spec, prompts, responses), columns or {}, side, count_tokens))
    if len(values) != len(responses):
        raise ValueError(f"Z '{spec.name}' ({spec.kind}) returned {len(values)} values for {len(responses)} responses")
    return values


def missing(values: np.ndarray) -> np.ndarray:
    """Mask of values that could not be measured (None or NaN)."""
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind == "O":
        return np.fromiter((v is None or (isinstance(v, float) and math.isnan(v)) for v in values), bool, len(values))
    return np.zeros(len(values), bool)


def _words_regex(words: Sequence[str]) -> str:
    """Whole-word alternation; spaces in a keyword match any whitespace."""
    alts = sorted((re.escape(w).replace(r"\ ", r"\s+") for w in words), key=len, reverse=True)
    return rf"(?<![\w-])(?:{'|'.join(alts)})(?![\w-])" if alts else r"(?!x)x"


@register("length")
def length(spec: SpuriousConfig, side: Side) -> np.ndarray:
    """Length in tokens of the configured tokenizer, in whitespace words or in characters."""
    if spec.unit == "chars":
        return np.fromiter(map(len, side.texts), np.int64, len(side.texts))
    if spec.unit == "words":
        return np.fromiter((len(t.split()) for t in side.texts), np.int64, len(side.texts))
    if side.count_tokens is None:
        raise ValueError(f"Z '{spec.name}': length in tokens needs a tokenizer")
    return np.asarray(side.count_tokens(side.texts), dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


@register("sycophancy")
def sycophancy(spec: SpuriousConfig, side: Side) -> np.ndarray:
    """1 if the text holds one of the phrases (case-insensitive) or matches the regex, else 0."""
    parts = [f"(?i:{'|'.join(map(re.escape, spec.phrases))})"] if spec.phrases else []
    parts += [spec.regex] if spec.regex else []
    pattern = _compiled("|".join(f"(?:{p})" for p in parts) or r"(?!x)x")
    return np.fromiter((pattern.search(t) is not None for t in side.texts), np.int64, len(side.texts))


def _column(spec: SpuriousConfig, side: Side) -> list[str | None]:
    name = spec.column or (spec.chosen_column if side.side == "chosen" else spec.rejected_column)
    return list(side.columns[name])


@register("concept")
def concept(spec: SpuriousConfig, side: Side) -> np.ndarray:
    """The first concept (in config order) one of whose keywords the text holds, or 'none'; or a label column."""
    if spec.column is not None:
        return np.array(_column(spec, side), dtype=object)
    patterns = [(name, _compiled("(?i)" + _words_regex(words))) for name, words in spec.keywords.items()]
    out = [next((name for name, pat in patterns if pat.search(t)), "none") for t in side.texts]
    return np.array(out, dtype=object)


@functools.lru_cache(maxsize=8)
def demographic_table(path: str | None = None) -> dict[str, list[tuple[str, re.Pattern]]]:
    """attribute -> [(group, compiled keywords + patterns)], from a JSON file (default: the packaged table)."""
    text = Path(path).read_text() if path else resources.files("ray_crm.resources").joinpath(
        "demographic_keywords.json").read_text()
    table = json.loads(text)
    out = {}
    for attr, groups in table.items():
        if attr.startswith("_"):
            continue
        out[attr] = [
            (group, re.compile("|".join([_words_regex(g["keywords"]), *g.get("patterns", [])]), re.IGNORECASE))
            for group, g in groups.items()
        ]
    return out


@register("demographic")
def demographic(spec: SpuriousConfig, side: Side) -> np.ndarray:
    """'age|gender|race' groups (4 x 3 x 5 = 60 joint values; 'unknown' where no keyword matches)."""
    table = demographic_table(spec.keywords_file)

    def label(text: str) -> str:
        parts = []
        for groups in table.values():
            counts = [len(pat.findall(text)) for _, pat in groups]
            best = int(np.argmax(counts))
            parts.append(groups[best][0] if counts[best] else UNKNOWN)
        return "|".join(parts)

    return np.array([label(t) for t in side.texts], dtype=object)


def _typed(spec: SpuriousConfig, values: Sequence[Any]) -> np.ndarray:
    """Categories as text, numbers as float64 (NaN where a value is missing or not a number)."""
    if not spec.continuous:
        return np.array([None if v is None else str(v) for v in values], dtype=object)

    def number(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    return np.fromiter(map(number, values), np.float64, len(values))


@register("column")
def column(spec: SpuriousConfig, side: Side) -> np.ndarray:
    """Z read from an input column: one per pair (`column`) or one per response (`chosen_column`/...)."""
    return _typed(spec, _column(spec, side))


@functools.lru_cache(maxsize=16)
def load_function(path: str) -> Callable[..., Sequence[Any]]:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"spurious function '{path}' cannot be imported: {exc}") from None


@register("function")
def function(spec: SpuriousConfig, side: Side) -> np.ndarray:
    """A user function `f(texts: list[str], **params) -> one value per text`, named by import path."""
    return _typed(spec, list(load_function(spec.function)(side.texts, **spec.params)))
