"""The VADER pair builder's off-topic pairs: an on-topic sentence beats a more positive one from another source."""

import numpy as np
import pyarrow as pa
import pytest

from ray_crm.config import VaderConfig
from ray_crm.data.vader import PROMPTS, vader_pairs


def _sentences(n: int = 400) -> pa.Table:
    rng = np.random.default_rng(0)
    sources = list(PROMPTS)
    return pa.table({
        "id": [f"s{i}" for i in range(n)],
        "text": [f"sentence {i} " + "word " * int(rng.integers(1, 12)) for i in range(n)],
        "mean_rating": rng.uniform(-3, 3, n).round(2),
        "source": [sources[i % len(sources)] for i in range(n)],
    })


def test_off_topic_pairs_prefer_the_prompt_s_source_over_higher_rated_praise():
    sentences = _sentences()
    table = vader_pairs(sentences, VaderConfig(num_pairs=200, off_topic=0.25, seed=3)).to_pandas()
    assert len(table) == 200 and (table.kind == "off_topic").sum() == 50 and (table.kind == "rating").sum() == 150
    assert table.kind.iloc[:50].nunique() == 2  # shuffled together, not appended
    source_of = dict(zip(sentences["id"].to_pylist(), sentences["source"].to_pylist()))
    off = table[table.kind == "off_topic"]
    assert (off.chosen_id.map(source_of) == off.source).all() and (off.rejected_id.map(source_of) != off.source).all()
    assert (off.prompt == off.source.map(PROMPTS)).all()
    assert (off.chosen_rating >= 0).all() and (off.rejected_rating > off.chosen_rating).mean() > 0.95
    rating = table[table.kind == "rating"]
    assert (rating.chosen_rating - rating.rejected_rating >= 1.0).all()  # min_gap
    again = vader_pairs(sentences, VaderConfig(num_pairs=200, off_topic=0.25, seed=3)).to_pandas()
    assert again.equals(table)


def test_without_off_topic_every_pair_is_a_rating_pair():
    table = vader_pairs(_sentences(), VaderConfig(num_pairs=100)).to_pandas()
    assert len(table) == 100 and set(table.kind) == {"rating"}
    with pytest.raises(ValueError):
        VaderConfig(off_topic=1.0)
