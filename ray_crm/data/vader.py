"""Preference pairs from the VADER human-rated sentences: the real-text analogue of the IMDB RLHF demo.

Two sentences of the same source whose mean human ratings differ by at least `min_gap` make a pair; the
more positive one is chosen and the prompt asks for a positive sentence of that source. Drawing is
deterministic by seed. VADER shows almost no link between length and rating (r = -0.04), so `length_bias`
can plant one: the share of pairs whose chosen response is the longer (ties in words left out), the way the
causal reward model paper plants sycophancy with p = 0.8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_crm.config import VaderConfig

PROMPTS = {
    "movie_reviews": "Write a positive sentence about a movie.",
    "amazon_reviews": "Write a positive sentence about a product you bought.",
    "tweets": "Write a positive tweet.",
    "nyt_editorials": "Write a positive sentence for a newspaper editorial.",
}
MAX_ROUNDS = 50


def build_pairs(sentences: pa.Table, num_pairs: int, min_gap: float = 1.0, seed: int = 0,
                length_bias: float | None = None) -> pa.Table:
    """`num_pairs` distinct pairs (prompt, chosen, rejected, source, ids and ratings)."""
    text = np.asarray(sentences["text"].to_pylist(), dtype=object)
    rating = sentences["mean_rating"].to_numpy()
    source = np.asarray(sentences["source"].to_pylist(), dtype=object)
    words = np.fromiter((len(t.split()) for t in text), np.int64, len(text))
    groups = [np.flatnonzero(source == s) for s in sorted(set(source))]
    members = np.concatenate(groups)  # sentence indices, grouped by source
    sizes = np.array([len(g) for g in groups])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    weights = sizes.astype(np.float64) ** 2  # pairs a source can give
    rng = np.random.default_rng(seed)
    quota = {None: num_pairs} if length_bias is None else {True: round(num_pairs * length_bias)}
    if length_bias is not None:
        quota[False] = num_pairs - quota[True]
    picked: dict[bool | None, list[int]] = {k: [] for k in quota}
    seen: set[int] = set()
    n = len(text)
    for _ in range(MAX_ROUNDS):
        if all(len(picked[k]) >= q for k, q in quota.items()):
            break
        g = rng.choice(len(groups), size=4 * num_pairs, p=weights / weights.sum())
        i, j = (members[offsets[g] + (rng.random(len(g)) * sizes[g]).astype(np.int64)] for _ in range(2))
        ok = np.abs(rating[i] - rating[j]) >= min_gap
        hi, lo = np.where(rating[i] > rating[j], i, j)[ok], np.where(rating[i] > rating[j], j, i)[ok]
        for h, low in zip(hi.tolist(), lo.tolist()):
            key = h * n + low
            cls = None if length_bias is None else bool(words[h] > words[low]) if words[h] != words[low] else "tie"
            if key in seen or cls == "tie" or len(picked[cls]) >= quota[cls]:
                continue
            seen.add(key)
            picked[cls].append(key)
    keys = np.array([k for ks in picked.values() for k in ks], np.int64)
    if len(keys) < num_pairs:
        raise ValueError(f"VADER: drew only {len(keys)} of {num_pairs} pairs with rating gap >= {min_gap}")
    keys = keys[rng.permutation(len(keys))]
    hi, lo = keys // n, keys % n
    return pa.table({
        "prompt": [PROMPTS[s] for s in source[hi]],
        "chosen": text[hi].tolist(),
        "rejected": text[lo].tolist(),
        "source": source[hi].tolist(),
        "chosen_id": sentences["id"].take(pa.array(hi)).to_pylist(),
        "rejected_id": sentences["id"].take(pa.array(lo)).to_pylist(),
        "chosen_rating": rating[hi],
        "rejected_rating": rating[lo],
    })


def off_topic_pairs(sentences: pa.Table, num_pairs: int, seed: int = 0) -> pa.Table:
    """`num_pairs` pairs: the prompt of a source, chosen a sentence of that source rated >= 0, rejected a sentence
    of another source rated higher (more positive, but not what was asked for). Same columns as `build_pairs`."""
    rating = sentences["mean_rating"].to_numpy()
    source = np.asarray(sentences["source"].to_pylist(), dtype=object)
    names = sorted(set(source))
    if len(names) < 2:
        raise ValueError("VADER: off-topic pairs need sentences of at least two sources")
    rng = np.random.default_rng([seed, 1])
    on_topic = {name: np.flatnonzero((source == name) & (rating >= 0)) for name in names}
    hi, lo = [], []
    for name in rng.choice(names, size=num_pairs):
        on = on_topic[name]
        c = int(on[rng.integers(len(on))])
        off = np.flatnonzero((source != name) & (rating > rating[c]))
        if len(off) == 0:  # the most positive sentence of all: nothing off topic beats it, draw again
            off = np.flatnonzero(source != name)
        hi.append(c)
        lo.append(int(off[rng.integers(len(off))]))
    text = sentences["text"].to_pylist()
    return pa.table({
        "prompt": [PROMPTS[source[h]] for h in hi],
        "chosen": [text[h] for h in hi],
        "rejected": [text[low] for low in lo],
        "source": [source[h] for h in hi],
        "chosen_id": sentences["id"].take(pa.array(hi)).to_pylist(),
        "rejected_id": sentences["id"].take(pa.array(lo)).to_pylist(),
        "chosen_rating": rating[hi],
        "rejected_rating": rating[lo],
    })


def vader_pairs(sentences: pa.Table, cfg: VaderConfig) -> pa.Table:
    """The pairs `data.vader` asks for: rating pairs and, with `off_topic` > 0, that share of off-topic pairs,
    shuffled together; column `kind` tells them apart."""
    n_off = round(cfg.num_pairs * cfg.off_topic)
    parts = [build_pairs(sentences, cfg.num_pairs - n_off, cfg.min_gap, cfg.seed, cfg.length_bias)]
    if n_off:
        parts.append(off_topic_pairs(sentences, n_off, cfg.seed))
    kinds = [pa.array([kind] * len(t)) for kind, t in zip(("rating", "off_topic"), parts)]
    table = pa.concat_tables([t.append_column("kind", k) for t, k in zip(parts, kinds)])
    return table.take(np.random.default_rng([cfg.seed, 2]).permutation(len(table))) if n_off else table


def write_pairs(cfg: VaderConfig, out: Path) -> Path:
    """Build the pairs from the fetched 'vader' asset into `out` (a Parquet file)."""
    from ray_crm.assets import asset_dir

    sentences = pq.read_table(asset_dir("vader") / "vader_sentences.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(vader_pairs(sentences, cfg), out)
    return out
