"""The bias benchmarks: deterministic by seed, the injected correlation at the stated rate in train (as the
prepare stage's extractors measure it), clean test pairs, and twins that differ only in Z."""

import re

import numpy as np
import pandas as pd
import pytest

from ray_crm.config import BenchConfig, SpuriousConfig
from ray_crm.data.spurious import extract
from ray_crm.eval import benchmarks as B

CFG = BenchConfig(train_pairs=400, validation_pairs=20, test_items=40, demographic_items=3, rate=0.8)
INTRO = re.compile(r"^I am an? \d+-year-old [^.]+\. ")


@pytest.fixture(scope="module")
def sentences():
    """A third of the VADER sentences: enough for small benchmarks, quick to scan for keywords."""
    full = B.load_sentences()
    return full.iloc[np.random.default_rng(0).choice(len(full), 8000, replace=False)]


@pytest.fixture(scope="module")
def built(sentences):
    return {name: B.build(name, CFG, sentences) for name in B.BUILDERS}


def z_of(kind: str, texts, **kw) -> np.ndarray:
    texts = list(texts)
    return extract(SpuriousConfig(name="z", kind=kind, **kw), texts, texts, "chosen")


def test_deterministic_by_seed(sentences, built):
    for name in B.BUILDERS:
        again = B.build(name, CFG, sentences)
        for split, frame in built[name].splits.items():
            pd.testing.assert_frame_equal(frame, again.splits[split])
        pd.testing.assert_frame_equal(built[name].probes, again.probes)
    other = B.build("sycophancy", CFG.model_copy(update={"seed": 1}), sentences)
    assert not other.splits["train"].equals(built["sycophancy"].splits["train"])


def test_no_sentence_crosses_splits(built):
    texts = {s: set(f.prompt.str.split("Text: ").str[1]) for s, f in built["sycophancy"].splits.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])


def test_sycophancy_prefix_rates(built):
    train, test = built["sycophancy"].splits["train"], built["sycophancy"].splits["test"]
    assert abs(z_of("sycophancy", train.chosen).mean() - 0.8) < 0.06
    assert abs(z_of("sycophancy", train.rejected).mean() - 0.2) < 0.06
    assert z_of("sycophancy", test.chosen).sum() == 0 and z_of("sycophancy", test.rejected).sum() == 0


def test_sycophancy_twins_move_only_the_prefix(built):
    probes = built["sycophancy"].probes
    for _, twin in probes.groupby("twin"):
        plain, flattering = twin[twin.z == "plain"].iloc[0], twin[twin.z == "sycophantic"].iloc[0]
        assert flattering.response == f"{B.PREFIX} {plain.response}" and flattering.prompt == plain.prompt
    assert (z_of("sycophancy", probes.response) == (probes.z == "sycophantic")).all()


def test_concept_train_links_positives_to_the_concept(built):
    train, test = built["concept"].splits["train"], built["concept"].splits["test"]
    assert abs(train.label[train.concept != "none"].mean() - 0.8) < 0.02
    assert train.label[train.concept == "none"].mean() == pytest.approx(0.5, abs=0.01)
    cells = test.groupby([test.concept != "none", "label"]).size()
    assert len(cells) == 4 and cells.nunique() == 1  # label-balanced, with and without C
    found = z_of("concept", test.prompt, keywords={CFG.concept: B.concept_keywords()[CFG.concept]})
    assert (found == test.concept).all()


def test_concept_twins_differ_only_in_the_concept(built):
    probes = built["concept"].probes
    padded = probes[probes.variant == "padded"]
    found = z_of("concept", padded.prompt, keywords={CFG.concept: B.concept_keywords()[CFG.concept]})
    assert (found == padded.z).all()
    for _, twin in padded.groupby("twin"):
        assert sorted(twin.z) == ["none", CFG.concept] and twin.response.nunique() == 1
        review = probes[(probes.item == twin.item.iloc[0]) & (probes.variant == "natural")].prompt.iloc[0]
        assert all(p.startswith(review + " ") for p in twin.prompt)


def test_length_chosen_is_longer_at_the_rate(built):
    words = lambda s: s.str.split().str.len()
    splits = built["length"].splits
    assert (words(splits["train"].chosen) > words(splits["train"].rejected)).mean() == pytest.approx(0.8)
    assert (words(splits["test"].chosen) > words(splits["test"].rejected)).mean() == pytest.approx(0.5)
    assert (splits["train"].chosen_rating - splits["train"].rejected_rating >= CFG.min_gap).all()


def test_length_twins_are_padded_originals(built):
    for _, twin in built["length"].probes.groupby("twin"):
        original, padded = twin[twin.z == "original"].iloc[0], twin[twin.z == "padded"].iloc[0]
        assert padded.response.startswith(original.response + " ") and padded.words > original.words


def test_demographic_groups_follow_the_label_in_train(built):
    splits = built["demographic"].splits
    for side, expected in (("chosen", 0.8), ("rejected", 0.2)):
        z = pd.Series(z_of("demographic", splits["train"][side])).str.split("|", expand=True)
        for k, (attr, favoured) in enumerate(B.FAVOURED.items()):
            assert abs((z[k] == favoured).mean() - expected) < 0.06, (side, attr)
    test = splits["test"]
    assert (z_of("demographic", test.chosen) == z_of("demographic", test.rejected)).all()  # one author per pair


def test_demographic_twins_swap_only_the_descriptor(built):
    twins = built["demographic"].probes.query("role == 'base'")
    assert (z_of("demographic", twins.response) == twins.z).all()
    for _, twin in twins.groupby("twin"):
        assert twin.z.nunique() == 60 and twin.prompt.nunique() == 1
        assert twin.response.str.replace(INTRO, "", regex=True).nunique() == 1


def test_ensure_reuses_and_rebuilds(tmp_path):
    cfg = BenchConfig(dir=str(tmp_path), train_pairs=50, validation_pairs=10, test_items=8)
    folder = B.ensure_benchmark("sycophancy", cfg)
    assert {p.name for p in folder.iterdir()} == {"train.parquet", "validation.parquet", "test.parquet",
                                                  "probes.parquet", "validation_probes.parquet", "meta.json"}
    stamp = (folder / "meta.json").stat().st_mtime_ns
    assert B.ensure_benchmark("sycophancy", cfg) == folder and (folder / "meta.json").stat().st_mtime_ns == stamp
    B.ensure_benchmark("sycophancy", cfg.model_copy(update={"seed": 3}))
    assert (folder / "meta.json").stat().st_mtime_ns != stamp


def test_validation_probes_are_built_from_the_validation_split(built):
    """The twins a sweep selects by hold validation inputs only, with the same layout as the test probes."""
    for b in built.values():
        val, test = b.validation_probes, b.probes
        assert len(val) and set(test.columns) <= set(val.columns) | {"chosen_longer", "guess_correct"}
        twins = val[val.twin != ""]
        assert len(twins) and (twins.groupby("twin").size() >= 2).all()
        assert not set(zip(val.prompt, val.response)) & set(zip(test.prompt, test.response))
    syc = built["sycophancy"]
    assert set(syc.validation_probes.prompt) <= set(syc.splits["validation"].prompt)
    length = built["length"]
    originals = length.validation_probes[length.validation_probes.z == "original"].response
    assert set(originals) <= set(length.splits["validation"].chosen) | set(length.splits["validation"].rejected)
