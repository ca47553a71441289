"""The real assets, as `make test` fetched them: they load, generate, and hold the expected rows."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from ray_crm.assets import MANIFEST, AssetError, asset_dir, fetch, resolve_model, verify


def test_vader_sentences_have_the_published_counts():
    table = pq.read_table(asset_dir("vader") / "vader_sentences.parquet")
    counts = {r["source"]: r["id_count"] for r in table.group_by("source").aggregate([("id", "count")]).to_pylist()}
    assert counts == {"tweets": 4200, "movie_reviews": 10605, "amazon_reviews": 3708, "nyt_editorials": 5190}
    ratings = table.column("mean_rating").to_numpy()
    assert ratings.min() >= -4 and ratings.max() <= 4 and len(set(table.column("id").to_pylist())) == table.num_rows
    assert "Hutto" in (asset_dir("vader") / "CITATION.txt").read_text()
    assert (asset_dir("vader") / "LICENSE.txt").exists()


def test_smollm2_generates_a_sentence():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32 and sum(p.numel() for p in model.parameters()) > 100e6
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


def test_minilm_scores_as_a_reward_backbone():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    batch = tok(["a great film", "an awful, boring film"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 1)


def test_checksums_hold_and_refetch_is_a_no_op():
    folder = asset_dir("minilm")
    before = (folder / MANIFEST).stat().st_mtime
    assert fetch("minilm") == folder and (folder / MANIFEST).stat().st_mtime == before
    verify("minilm")
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert "model.safetensors" in files and len(files["model.safetensors"]["sha256"]) == 64


def test_unknown_model_and_missing_asset_errors(tmp_path, monkeypatch):
    with pytest.raises(AssetError, match="neither an asset alias"):
        resolve_model(str(tmp_path))
    monkeypatch.setenv("RAY_CRM_CACHE", str(tmp_path))
    with pytest.raises(AssetError, match="ray-crm assets --only smollm2"):
        resolve_model("smollm2")
