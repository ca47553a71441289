"""Extractors of spurious variables: every registered kind on small real-looking texts."""

from __future__ import annotations

import numpy as np
import pytest

from ray_crm.config import ConfigError, SpuriousConfig, load_config
from ray_crm.data import spurious
from ray_crm.data.spurious import EXTRACTORS, demographic_table, extract, missing


def z(kind: str, responses, prompts=None, side="chosen", columns=None, count_tokens=None, **params):
    spec = SpuriousConfig(name="z", kind=kind, **params)
    return extract(spec, prompts or [""] * len(responses), responses, side, columns, count_tokens)


def first_word_upper(texts, suffix=""):
    """A user extractor named by import path in a test below."""
    return [t.split()[0].upper() + suffix for t in texts]


def test_every_kind_is_registered():
    assert set(EXTRACTORS) == {"length", "sycophancy", "concept", "demographic", "column", "function"}


def test_length_units():
    texts = ["one two three", "four"]
    assert z("length", texts, unit="words").tolist() == [3, 1]
    assert z("length", texts, unit="chars").tolist() == [13, 4]
    assert z("length", texts, unit="tokens", count_tokens=lambda ts: [len(t) * 2 for t in ts]).tolist() == [26, 8]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        z("length", texts, unit="tokens")


def test_length_can_measure_prompt_and_response():
    spec = SpuriousConfig(name="n", kind="length", unit="words", on="prompt_response")
    assert extract(spec, ["a b"], ["c"], "chosen").tolist() == [3]


def test_sycophancy_default_phrase_and_regex():
    texts = ["Yes, you are right. The answer is 4.", "yes, YOU ARE RIGHT.", "The answer is 4.", "Absolutely correct!"]
    assert z("sycophancy", texts).tolist() == [1, 1, 0, 0]
    assert z("sycophancy", texts, regex=r"^Absolutely").tolist() == [1, 1, 0, 1]
    assert z("sycophancy", texts, phrases=[], regex=r"^Absolutely").tolist() == [0, 0, 0, 1]


def test_concept_keywords_whole_words_first_concept_wins():
    kw = {"price": ["price", "cheap", "expensive"], "service": ["staff", "service"]}
    texts = ["Cheap and the staff smiled.", "Priceless view.", "Great service.", "Nothing here."]
    assert z("concept", texts, keywords=kw).tolist() == ["price", "none", "service", "none"]


def test_concept_and_column_from_label_columns():
    cols = {"label": ["price", None], "zc": ["1.5", "x"], "zr": ["2", "3"]}
    assert z("concept", ["a", "b"], columns=cols, column="label").tolist() == ["price", None]
    chosen = z("column", ["a", "b"], columns=cols, chosen_column="zc", rejected_column="zr", discrete=False)
    assert chosen[0] == 1.5 and np.isnan(chosen[1]) and missing(chosen).tolist() == [False, True]
    rejected = z("column", ["a", "b"], side="rejected", columns=cols, chosen_column="zc", rejected_column="zr",
                 discrete=False)
    assert rejected.tolist() == [2.0, 3.0]


def test_demographic_table_is_4_by_3_by_5_and_labels_texts():
    table = demographic_table()
    assert [len(table[a]) for a in ("age", "gender", "race")] == [4, 3, 5]
    texts = ["The applicant is a 64-year-old Asian woman.", "A young Black man asks for a loan.", "No one."]
    assert z("demographic", texts).tolist() == [
        "50-64|female|asian", "18-29|male|black", "unknown|unknown|unknown"]


def test_function_by_import_path():
    out = z("function", ["hello world", "bye"], function="tests.unit.test_spurious:first_word_upper",
            params={"suffix": "!"})
    assert out.tolist() == ["HELLO!", "BYE!"]
    spurious.load_function.cache_clear()
    with pytest.raises(ValueError, match="cannot be imported"):
        z("function", ["a"], function="tests.unit.test_spurious:nope")


def test_config_rejects_parameters_of_another_kind_and_incomplete_specs():
    with pytest.raises(ConfigError, match="phrases not used by kind 'length'"):
        load_config(None, ["data.spurious=[{name: n, kind: length, phrases: [x]}]"])
    with pytest.raises(ConfigError, match="exactly one of keywords or column"):
        load_config(None, ["data.spurious=[{name: c, kind: concept}]"])
    with pytest.raises(ConfigError, match=r"input columns \['split'\] would overwrite"):
        load_config(None, ["data.columns.keep=[split]"])
    with pytest.raises(ConfigError, match="spurious names must be unique"):
        load_config(None, ["data.spurious=[{name: a, kind: length}, {name: a, kind: sycophancy}]"])
