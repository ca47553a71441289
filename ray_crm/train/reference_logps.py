"""DPO's reference log-probs computed once (`loss.reference=precomputed`) with Ray Data batch inference, instead of
a second forward with the LoRA adapter switched off in every step and every validation.

The base model scores every train and validation pair (and the validation twins) once; the result is cached
under `<output_dir>/reference_logps/<key>`, the key hashing the base model, its precision, the tokenization and
the prepared data, so every run, seed and Tune trial on the same data reuses it. Written beside and swapped in
whole: a killed run leaves no half cache. Workers read it by pair_id (`attach_reference`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ray_crm.assets import resolve_model
from ray_crm.config import Config, LoraConfig
from ray_crm.data.outdir import output_lock, staged_output
from ray_crm.runtime import set_threads

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
TWINS = "twins"
SIDES = ("chosen", "rejected")


class ReferenceLogprobs:
    """map_batches callable: for each `<prefix>input_ids` / `<prefix>response_start` column pair, the base model's
    summed log-probs of the response tokens as `<prefix>ref_logp` (batches cut to the logit budget)."""

    def __init__(self, model: str, precision: str, pad_id: int, prefixes: tuple[str, ...], threads: int,
                 use_gpu: bool) -> None:
        import torch

        from ray_crm.models.loading import load_policy_model

        set_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = load_policy_model(model, LoraConfig(enabled=False), pad_id, precision).to(self.device).eval()
        self.pad_id, self.prefixes = pad_id, prefixes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray_crm.models.logprobs import logprobs_by_length, rows_within_logit_budget

        out = {"pair_id": batch["pair_id"]}
        for prefix in self.prefixes:
            ids = list(batch[f"{prefix}input_ids"])
            rows = rows_within_logit_budget(self.model.config.vocab_size, max(map(len, ids)), 64)
            out[f"{prefix}ref_logp"] = logprobs_by_length(self.model, ids, batch[f"{prefix}response_start"],
                                                          self.pad_id, rows, self.device)
        return out


def cache_key(cfg: Config, manifest: dict[str, Any]) -> str:
    """What the reference's log-probs depend on: the base model, its precision, the token length and the data."""
    from ray_crm.data.pipeline import manifest_digest

    twins = Path(cfg.data.twins) if cfg.data.twins else None
    keyed = {"model": str(resolve_model(cfg.model.name)), "precision": cfg.model.precision,
             "max_length": cfg.model.max_length, "data": manifest_digest(manifest),
             "twins": hashlib.sha1(twins.read_bytes()).hexdigest() if twins else None}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def reference_logps(cfg: Config, data_dir: Path, manifest: dict[str, Any], datasets: dict[str, Any]) -> Path:
    """The folder of the cached reference log-probs for `cfg`'s prepared data, computed now if absent.

    `datasets`: the prepared train and validation Ray Datasets. Runs `train.num_workers` Ray Data actors of
    `train.cpus_per_worker` CPUs (one GPU each with `train.use_gpu`)."""
    import ray

    from ray_crm.data.encode import encode_twins
    from ray_crm.data.pipeline import manifest_digest
    from ray_crm.models.loading import load_tokenizer

    out = Path(cfg.output_dir).resolve() / "reference_logps" / cache_key(cfg, manifest)
    if (out / "done.json").is_file():
        return out
    actor = {"model": str(resolve_model(cfg.model.name)), "precision": cfg.model.precision,
             "pad_id": load_tokenizer(cfg.model).pad_token_id, "threads": cfg.ray.torch_threads,
             "use_gpu": cfg.train.use_gpu}
    compute = {"batch_format": "numpy", "batch_size": 128, "concurrency": cfg.train.num_workers,
               "num_cpus": cfg.train.cpus_per_worker, "num_gpus": 1 if cfg.train.use_gpu else None}
    columns = ["pair_id", *(f"{s}_{c}" for s in SIDES for c in ("input_ids", "response_start"))]
    sources = {split: (datasets[split].select_columns(columns), tuple(f"{s}_" for s in SIDES)) for split in SPLITS}
    twins = encode_twins(cfg)
    if twins is not None:
        sources[TWINS] = (ray.data.from_items([
            {"pair_id": i, "input_ids": ids, "response_start": int(start)}
            for i, (ids, start) in enumerate(zip(twins["input_ids"], twins["response_start"], strict=True))]), ("",))
    logger.info("computing the reference log-probs of %s into %s", data_dir, out)
    with output_lock(out), staged_output(out, [*SPLITS, TWINS, "done.json"]) as work:
        counts = {}
        for name, (ds, prefixes) in sources.items():
            scored = ds.repartition(4 * cfg.train.num_workers).map_batches(  # blocks enough for every actor
                ReferenceLogprobs, fn_constructor_kwargs={**actor, "prefixes": prefixes}, **compute)
            table = scored.to_pandas().sort_values("pair_id", kind="stable")  # encode_twins order for the twins
            columns = {"pair_id": table["pair_id"].to_numpy().astype(str)}  # not object: loads without pickle
            columns.update({c: table[c].to_numpy(np.float64) for c in table.columns if c.endswith("ref_logp")})
            np.savez(work / f"{name}.npz", **columns)
            counts[name] = len(table)
        (work / "done.json").write_text(json.dumps({"rows": counts, "data": manifest_digest(manifest)}))
    return out


def attach_reference(rows: dict[str, np.ndarray], folder: Path, split: str) -> dict[str, np.ndarray]:
    """`rows` (sorted by pair_id) with `chosen_ref_logp` and `rejected_ref_logp` from the cache: refused if
    the cache does not hold exactly these pairs."""
    with np.load(folder / f"{split}.npz", allow_pickle=False) as cached:
        ids = cached["pair_id"]
        if len(ids) != len(rows["pair_id"]) or not np.array_equal(ids.astype(str), rows["pair_id"].astype(str)):
            raise ValueError(f"{folder / split}.npz holds other pairs than the prepared {split} split: delete "
                             f"{folder} to compute it again")
        return {**rows, **{f"{s}_ref_logp": cached[f"{s}_ref_logp"] for s in SIDES}}


def twin_reference(folder: Path, count: int) -> np.ndarray:
    """The cached reference log-probs of the `count` validation twins, in `encode_twins` order."""
    with np.load(folder / f"{TWINS}.npz", allow_pickle=False) as cached:
        if len(cached["pair_id"]) != count:
            raise ValueError(f"{folder / TWINS}.npz holds {len(cached['pair_id'])} twins, data.twins {count}")
        return cached["ref_logp"]
