"""Training on preference pairs on Ray Train + DeepSpeed + PEFT LoRA, with the pair loss `loss.type` names:
reward models (Bradley-Terry, or the causal RM: BT + MMD over Z bins) and policies trained by DPO, IPO or Causal
DPO, scored by their implicit reward beta * log(pi / pi_ref) (the reference: the adapter switched off). Both
kinds share the data plan, the penalty, validation (accuracy, bias metrics, twins), checkpoints and export.

Every worker reads the whole prepared split and builds the same bin-stratified plan of global batches from
the seed, then takes its slice (rank::world) of each; the MMD penalty is computed over the global batch by a
differentiable all-gather. So 2 workers with B/2 pairs each train exactly as 1 worker with B. With gradient
accumulation the BT loss averages over the whole global batch, while the MMD is computed per micro-step
over world x micro pairs (each stratified on its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_crm.checkpoint import file_manifest, latest_verified, verify_checkpoint, write_marker
from ray_crm.config import Config, pair_stage, run_name
from ray_crm.data.encode import encode_twins
from ray_crm.data.outdir import output_lock, staged_output
from ray_crm.data.sampler import StratifiedBatchSampler
from ray_crm.eval.metrics import invariance_gap, twin_scale, within_label_spearman, z_balanced_accuracy
from ray_crm.losses import (
    MMDConfig,
    PairLossSettings,
    bradley_terry_loss,
    bt_calibration_scale,
    crm_loss,
    gather_global,
    mirror_balance_weights,
    mirror_resample_index,
    pair_loss,
    warmed_up_lambda,
)
from ray_crm.models.loading import (
    load_pair_model,
    load_tokenizer,
    pad_sequences,
    pair_sequences,
    score,
    score_packed,
)
from ray_crm.models.logprobs import implicit_reward, rows_within_logit_budget
from ray_crm.models.packing import PackedSequences, pack_sequences
from ray_crm.runtime import init_ray, set_threads
from ray_crm.train.deepspeed_config import deepspeed_config, micro_batch_size
from ray_crm.train.learner import DeepSpeedLearner, join_process_group, trainable
from ray_crm.train.metric_names import higher_is_better
from ray_crm.train.metrics_log import MetricsLog
from ray_crm.train.reference_logps import attach_reference, reference_logps, twin_reference

logger = logging.getLogger(__name__)

VAL_SCORES = "val_scores.npz"
ENGINE = "engine"  # a checkpoint's folder of the learner layer's engine state
EXPORT_FILES = ("merged", "adapter", "model_card.json", VAL_SCORES)
COLUMNS = ("pair_id", "chosen_input_ids", "rejected_input_ids", "chosen_token_type_ids", "rejected_token_type_ids",
           "chosen_response_start", "rejected_response_start", "bin_chosen", "bin_rejected", "stratum")


def mmd_settings(cfg: Config, num_bins: int) -> MMDConfig:
    m = cfg.loss.mmd
    return MMDConfig(bandwidth=m.bandwidth, unbiased=m.unbiased, reduction=m.reduction, num_bins=num_bins,
                     standardize=m.standardize, z_kernel=m.z_kernel)


def loss_settings(cfg: Config, num_bins: int) -> PairLossSettings:
    return PairLossSettings(lam=cfg.loss.lambda_mmd, variant=cfg.loss.variant, mmd=mmd_settings(cfg, num_bins),
                            beta=cfg.loss.beta)


def sequence_scores(cfg: Config, engine, batch: dict[str, torch.Tensor] | PackedSequences, starts: np.ndarray | None,
                    with_representation: bool = False, reference: np.ndarray | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the pair loss compares, per sequence: a reward head's reward, or a policy's implicit reward (against
    the precomputed `reference` log-probs if given, else the adapter switched off)."""
    if cfg.loss.trains_policy:
        ids = batch.input_ids if isinstance(batch, PackedSequences) else batch["input_ids"]
        ref = None if reference is None else torch.as_tensor(reference, device=ids.device)
        return implicit_reward(engine, batch, starts, cfg.loss.beta, ref), None
    if isinstance(batch, PackedSequences):
        return score_packed(engine, batch, with_representation)
    return score(engine, batch, with_representation)


def _both(rows: dict[str, np.ndarray], column: str) -> np.ndarray | None:
    """`chosen_<column>` then `rejected_<column>`, the order the pair's sequences are scored in, or None."""
    if f"chosen_{column}" not in rows:
        return None
    return np.concatenate([rows[f"chosen_{column}"], rows[f"rejected_{column}"]])


def _starts(rows: dict[str, np.ndarray]) -> np.ndarray | None:
    return _both(rows, "response_start")


def z_columns(cfg: Config, side: str) -> list[str]:
    """The prepared columns holding each Z's measured value of one side of the pair."""
    return [f"z_{z.name}_{side}" for z in cfg.data.spurious]


def _materialise(shard, columns=COLUMNS) -> dict[str, np.ndarray]:
    """A Ray Data shard -> numpy columns in memory, sorted by pair_id.

    Reward-model data is small and the stratified plan needs random access; sorting makes every worker hold
    the rows in the same order whatever order Ray Data streamed the blocks in.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        for key in columns:
            if key in batch:
                parts.setdefault(key, []).append(batch[key])
    rows = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(rows["pair_id"], kind="stable")
    return {k: v[order] for k, v in rows.items()}


def _take(rows: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in rows.items()}


def _loss(cfg: Config, engine, rows: dict[str, np.ndarray], settings: PairLossSettings, device, global_batch: bool):
    ids, types = pair_sequences(rows)
    pad_id = engine.module.config.pad_token_id
    if cfg.train.pack_tokens:
        batch = pack_sequences(ids, pad_id, cfg.train.pack_tokens, types).to(device)
        computed = batch.input_ids.numel()
    else:
        batch = pad_sequences(ids, types, pad_id, device)
        computed = batch["input_ids"].numel()
    with_repr = cfg.loss.type == "crm" and cfg.loss.mmd.on == "representation"
    rewards, reps = sequence_scores(cfg, engine, batch, _starts(rows), with_repr, _both(rows, "ref_logp"))
    n = len(rows["bin_chosen"])
    feats = {} if reps is None else {"chosen_features": reps[:n], "rejected_features": reps[n:]}
    bins_c = torch.as_tensor(rows["bin_chosen"], dtype=torch.long, device=device)
    bins_r = torch.as_tensor(rows["bin_rejected"], dtype=torch.long, device=device)
    if "weight" in rows:
        feats["weights"] = torch.as_tensor(rows["weight"], dtype=rewards.dtype, device=device)
    if settings.mmd.z_kernel == "rbf":
        for side in ("chosen", "rejected"):
            z = np.stack([np.asarray(rows[c], dtype=np.float64) for c in z_columns(cfg, side)], axis=1)
            feats[f"{side}_z"] = torch.as_tensor(z, dtype=torch.float32, device=device)  # not bf16: lengths > 256 round; NaN: left out
    loss, metrics = pair_loss(cfg.loss.type)(rewards[:n], rewards[n:], bins_c, bins_r, settings,
                                             global_batch=global_batch, **feats)
    metrics["padding_share"] = torch.tensor(1 - sum(map(len, ids)) / computed)  # of the positions run through
    return loss, metrics


def _scalar_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.numel() == 1}


@torch.no_grad()
def _score_all(cfg: Config, engine, ids: list, types: list | None, starts: np.ndarray | None, rank: int, world: int,
               device, batch: int = 128, reference: np.ndarray | None = None) -> np.ndarray:
    """The score (`sequence_scores`) of every sequence, in order, on every rank.

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively): short ranks
    repeat their last sequence and drop the repeats. A policy's batches are cut to keep their full-vocabulary
    logits within `LOGIT_BUDGET`.
    """
    total = len(ids)
    if cfg.loss.trains_policy:  # the same size on every rank: all run the same number of forwards
        batch = rows_within_logit_budget(engine.module.config.vocab_size, max(map(len, ids), default=1), batch)
    mine = np.arange(total)[rank::world]
    mine = mine[np.argsort([len(ids[i]) for i in mine], kind="stable")]  # batches of like length: less padding
    per_rank = -(-total // world)
    padded = np.concatenate([mine, np.full(per_rank - len(mine), mine[-1] if len(mine) else 0)]).astype(int)
    engine.eval()
    rewards = []
    for start in range(0, per_rank, batch):
        part = padded[start : start + batch]
        inputs = pad_sequences([ids[i] for i in part], None if types is None else [types[i] for i in part],
                               engine.module.config.pad_token_id, device)
        rewards.append(sequence_scores(cfg, engine, inputs, None if starts is None else starts[part], False,
                                       None if reference is None else reference[part])[0])
    engine.train()
    local = torch.cat(rewards)[: len(mine)]
    scores, index = gather_global(local, torch.as_tensor(mine, dtype=torch.long, device=device))
    return scores[index.argsort()].cpu().numpy()


@torch.no_grad()
def evaluate(cfg: Config, engine, rows: dict[str, np.ndarray], mmd: MMDConfig, rank: int, world: int, device,
             twins: dict[str, Any] | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Pairwise accuracy, BT loss and the MMD penalty over the whole validation split, and every pair's
    (chosen, rejected) rewards [N, 2] in row order; with `twins` (see `encode_twins`) also their counterfactual
    invariance gap. All ranks take part and get the same answer."""
    total = len(rows["bin_chosen"])
    types = None
    if "chosen_token_type_ids" in rows:
        types = list(rows["chosen_token_type_ids"]) + list(rows["rejected_token_type_ids"])
    flat = _score_all(cfg, engine, list(rows["chosen_input_ids"]) + list(rows["rejected_input_ids"]), types,
                      _starts(rows), rank, world, device, reference=_both(rows, "ref_logp"))
    scores = np.stack([flat[:total], flat[total:]], axis=1)
    bins = {k: torch.as_tensor(rows[k], dtype=torch.long) for k in ("bin_chosen", "bin_rejected")}
    _, metrics = crm_loss(torch.as_tensor(scores[:, 0]), torch.as_tensor(scores[:, 1]), bins["bin_chosen"],
                          bins["bin_rejected"], 0.0, cfg.loss.variant, dataclasses.replace(mmd, z_kernel="bins"))
    summary = {
        "val_accuracy": float(metrics["reward/accuracy"]),
        "val_bt_loss": float(metrics["loss/preference"]),
        "val_mmd": float(metrics["mmd/penalty"]),
        "val_reward_std": float(flat.std()),
        "val_balanced_accuracy": z_balanced_accuracy(scores[:, 0], scores[:, 1], rows["bin_chosen"], rows["bin_rejected"]),
        "val_pairs": total,
    }
    summary.update(z_correlations(cfg, rows, scores))
    if twins is not None:
        rewards = _score_all(cfg, engine, twins["input_ids"], twins["token_type_ids"], twins["response_start"],
                             rank, world, device, reference=twins.get("ref_logp"))
        gap, scale = invariance_gap(rewards, twins["twin"]), twin_scale(rewards, twins["twin"])
        summary.update(val_ci_gap=gap, val_ci_gap_std=gap / scale if scale > 0 else float("inf"))
    return summary, scores


def z_correlations(cfg: Config, rows: dict[str, np.ndarray], scores: np.ndarray) -> dict[str, float]:
    """`val_spearman_<z>` per spurious variable (within-label |Spearman(reward, Z)|, or for a categorical Z the
    rank correlation ratio), and `val_z_spearman`, the largest: a scale-free bias metric for sweeps (the MMD
    shrinks with the rewards)."""
    out = {}
    for z in cfg.data.spurious:
        zc, zr = rows.get(f"z_{z.name}_chosen"), rows.get(f"z_{z.name}_rejected")
        if zc is not None and zr is not None:
            out[f"val_spearman_{z.name}"] = within_label_spearman(scores[:, 0], scores[:, 1], zc, zr)
    if out:
        out["val_z_spearman"] = max(out.values())
    return out


def _save_checkpoint(learner: DeepSpeedLearner, folder: Path, state: dict[str, Any], rank: int,
                     val_scores: dict[str, np.ndarray]) -> None:
    """The learner layer's engine state (all ranks, for resume; no pickle) + the HF weights (adapter or full
    model) + the loop state + the validation rewards the trainer measured (so an export can be checked against
    them).

    Every rank fills its own folder and Ray merges them into one checkpoint, so rank 0 writes the
    completion marker last, listing the files of every rank: the merged folder verifies only once all arrived.
    """
    import torch.distributed as dist

    learner.save_engine(folder / ENGINE)
    with learner.whole(learner.params):
        if rank == 0:
            learner.model.save_pretrained(folder / "model", safe_serialization=True)
            (folder / "state.json").write_text(json.dumps(state))
            np.savez(folder / VAL_SCORES, **val_scores)
    manifests = [None] * dist.get_world_size()
    dist.all_gather_object(manifests, file_manifest(folder))
    if rank == 0:
        write_marker(folder, f"step_{state['step']:06d}", {k: v for part in manifests for k, v in part.items()})


def latest_complete_checkpoint(storage: Path) -> Path | None:
    """The newest checkpoint folder of this run that verifies (see `ray_crm.checkpoint`); newer broken ones
    are skipped with a warning.

    Ray registers a checkpoint only once its controller has processed the report; a worker killed in between
    leaves a complete checkpoint on disk that `ray.train.get_checkpoint()` does not return.
    """
    return latest_verified(storage, "checkpoint_*")


@contextlib.contextmanager
def _resume_folder(storage: Path):
    """Ray's registered checkpoint if it verifies, else `latest_complete_checkpoint` (None: start afresh)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as found:
            reason = verify_checkpoint(Path(found))
            if reason is None:
                yield Path(found)
                return
            logger.warning("skipping checkpoint %s: %s", found, reason)
    yield latest_complete_checkpoint(storage)


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop Ray Train runs."""
    import ray.train

    cfg = Config.model_validate(config["cfg"])
    set_threads(cfg.ray.torch_threads)
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    join_process_group(cfg.train.use_gpu, rank, world)  # DeepSpeed adopts the process group Ray Train created
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.train.seed)  # identical LoRA init on every rank
    model = load_pair_model(cfg.model, tok.pad_token_id, policy=cfg.loss.trains_policy)
    optimizer = torch.optim.AdamW(trainable(model), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    learner = DeepSpeedLearner(model, optimizer, deepspeed_config(cfg.train, cfg.model, world), rank, world)
    engine = learner.engine
    zs = (*z_columns(cfg, "chosen"), *z_columns(cfg, "rejected"))
    train_rows = _materialise(ray.train.get_dataset_shard("train"), COLUMNS + zs)
    reference = config.get("reference_dir") and Path(config["reference_dir"])
    if reference:
        train_rows = attach_reference(train_rows, reference, "train")
    bins = (train_rows["bin_chosen"], train_rows["bin_rejected"])
    if cfg.loss.balance == "mirror":  # every worker holds the whole split: the same weights on every rank
        train_rows["weight"] = mirror_balance_weights(*bins)
    elif cfg.loss.balance == "mirror_sample":  # likewise the same draw on every rank
        train_rows = _take(train_rows, mirror_resample_index(*bins, seed=cfg.train.seed))
    val_rows = _materialise(ray.train.get_dataset_shard("validation"), COLUMNS + zs)
    twins = encode_twins(cfg)
    if reference:
        val_rows = attach_reference(val_rows, reference, "validation")
        if twins is not None:
            twins["ref_logp"] = twin_reference(reference, len(twins["input_ids"]))
    settings = loss_settings(cfg, config["num_bins"])
    mmd = settings.mmd
    micro = micro_batch_size(cfg.train, world)
    sampler = StratifiedBatchSampler(train_rows["stratum"], batch_size=micro * world, seed=cfg.train.seed)
    state = {"epoch": 0, "micro_step": 0, "step": 0, "resumed_from_step": 0}
    with _resume_folder(Path(config["storage_dir"])) as found:
        if found is not None:
            learner.load_engine(found / ENGINE)
            state = json.loads((found / "state.json").read_text())
            state["resumed_from_step"] = state["step"]
    train_log = MetricsLog(Path(config["log_dir"]), "train") if rank == 0 else None
    eval_log = MetricsLog(Path(config["log_dir"]), "eval") if rank == 0 else None
    for log in (train_log, eval_log) if rank == 0 else ():  # steps after the checkpoint are about to run again
        log.drop_after(state["step"])
    steps_per_epoch = len(sampler) // cfg.train.grad_accum
    max_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else steps_per_epoch * cfg.train.epochs
    warmup_steps = round(cfg.loss.lambda_warmup * max_steps)
    tick, pairs = time.perf_counter(), 0

    def report(reason: str) -> None:
        summary, scores = evaluate(cfg, engine, val_rows, mmd, rank, world, device, twins)
        metrics = {**summary, **state, "epoch_end": reason == "epoch"}
        if eval_log is not None:
            eval_log.write(state["step"], metrics)
        with tempfile.TemporaryDirectory() as folder:
            _save_checkpoint(learner, Path(folder), state, rank,
                             {"pair_id": val_rows["pair_id"].astype(str), "chosen": scores[:, 0], "rejected": scores[:, 1]})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    while state["step"] < max_steps and state["epoch"] < cfg.train.epochs:
        plan = list(sampler.batches(state["epoch"]))
        usable = len(plan) - len(plan) % cfg.train.grad_accum
        while state["micro_step"] < usable and state["step"] < max_steps:
            rows = _take(train_rows, sampler.shard(plan[state["micro_step"]], rank, world))
            lam = warmed_up_lambda(settings.lam, state["step"], warmup_steps)
            loss, metrics = _loss(cfg, engine, rows, dataclasses.replace(settings, lam=lam), device,
                                  global_batch=world > 1)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            state["micro_step"] += 1
            pairs += len(plan[state["micro_step"] - 1])
            if not boundary:
                continue
            state["step"] += 1
            if train_log is not None:
                elapsed = time.perf_counter() - tick
                train_log.write(state["step"], {**_scalar_metrics(metrics), "epoch": state["epoch"],
                                          "pairs_per_s": pairs / elapsed, "lr": engine.get_lr()[0],
                                          "lambda": lam})
                tick, pairs = time.perf_counter(), 0
            every = [n for n in (cfg.train.eval_every, cfg.train.checkpoint_every) if n]
            if any(state["step"] % n == 0 for n in every) and state["step"] < max_steps:
                report("step")
        state["epoch"] += state["micro_step"] >= usable
        state["micro_step"] = 0 if state["micro_step"] >= usable else state["micro_step"]
        report("epoch")
    dist.barrier()


def reward_calibration(cfg: Config, scores: dict[str, np.ndarray]) -> dict[str, float]:
    """The export's reward scale (`train.calibrate_scale`; reward models only) and the validation BT loss and
    reward spread before and after it."""
    chosen, rejected = torch.as_tensor(scores["chosen"]), torch.as_tensor(scores["rejected"])
    on = cfg.train.calibrate_scale and not cfg.loss.trains_policy
    scale = bt_calibration_scale(chosen - rejected) if on else 1.0
    flat = torch.cat([chosen, rejected])
    return {"scale": scale, "val_bt_loss": float(bradley_terry_loss(chosen, rejected)[0]),
            "val_bt_loss_calibrated": float(bradley_terry_loss(scale * chosen, scale * rejected)[0]),
            "val_reward_std": float(flat.std()), "val_reward_std_calibrated": float(scale * flat.std())}


def run_train_rm(cfg: Config, datasets: dict[str, Any] | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """`ray-crm train-rm`: a reward model (loss.type bt or crm); see `train_on_pairs`."""
    if cfg.loss.trains_policy:
        raise ValueError(f"loss.type={cfg.loss.type} trains a policy: run `ray-crm train-dpo`")
    return train_on_pairs(cfg, datasets, callbacks)


def run_train_dpo(cfg: Config, datasets: dict[str, Any] | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """`ray-crm train-dpo`: a causal LM policy by DPO, IPO or Causal DPO (loss.type); see `train_on_pairs`."""
    if not cfg.loss.trains_policy:
        raise ValueError(f"loss.type={cfg.loss.type} trains a reward model: run `ray-crm train-rm`, or set "
                         "loss.type to dpo, ipo or causal_dpo")
    return train_on_pairs(cfg, datasets, callbacks)


def train_on_pairs(cfg: Config, datasets: dict[str, Any] | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Train one model on the prepared pairs as `cfg` says, export it, and return where it is and how it scores.

    `datasets` lets a Tune trial pass Ray Datasets built in the driver; `callbacks` go to the
    trainer's RunConfig (Tune's TuneReportCallback).
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_crm.data.pipeline import check_prepared_for, load_manifest, manifest_digest, read_prepared
    from ray_crm.models.loading import export_model

    init_ray(cfg.ray)
    if cfg.data.twins:  # workers run in Ray's session folder: pin the path to what this process sees
        cfg = cfg.model_copy(deep=True)
        cfg.data.twins = str(Path(cfg.data.twins).resolve())
    data_dir = cfg.prepared_dir()
    manifest = load_manifest(data_dir)
    check_prepared_for(cfg, manifest, data_dir)
    if cfg.loss.trains_policy and (manifest.get("tokenizer") or {}).get("mode") != "chat":
        raise ValueError(f"loss.type={cfg.loss.type} learns from each response's tokens, which {data_dir} does not "
                         "mark: prepare it with a chat-template tokenizer (a decoder model.name, data.template=chat)")
    if datasets is None:  # read once here: every worker then streams the same blocks from the object store
        datasets = {split: read_prepared(data_dir, split).materialize() for split in ("train", "validation")}
    reference = reference_logps(cfg, data_dir, manifest, datasets) if cfg.loss.reference == "precomputed" else None
    name = run_name(cfg)
    stage = pair_stage(cfg)
    out = cfg.stage_dir(stage) / name
    order = "max" if higher_is_better(cfg.train.checkpoint_metric) else "min"
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "num_bins": manifest["num_bins"],
                           "log_dir": str(out / "logs"),
                           "storage_dir": str(cfg.stage_dir(stage) / "ray" / name),
                           "reference_dir": reference and str(reference)},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(cfg.stage_dir(stage) / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.train.checkpoint_metric,
                                               checkpoint_score_order=order),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    sign = 1.0 if order == "max" else -1.0
    best, best_metrics = max(result.best_checkpoints, key=lambda cm: sign * cm[1][cfg.train.checkpoint_metric])
    export = out / "export"  # written beside the previous export and swapped in whole: a failed export loses nothing
    with best.as_directory() as folder, output_lock(export), staged_output(export, EXPORT_FILES) as work:
        scores = dict(np.load(Path(folder) / VAL_SCORES))
        calibration = reward_calibration(cfg, scores)
        card = {"run": name, "config": cfg.model_dump(mode="json"), "data_manifest": manifest_digest(manifest),
                "metrics": best_metrics, "final_metrics": result.metrics, "reward_calibration": calibration}
        export_model(cfg.model, Path(folder) / "model", work, card, manifest, policy=cfg.loss.trains_policy,
                     reward_scale=calibration["scale"])
        for side in ("chosen", "rejected"):  # the export's own rewards of the validation pairs
            scores[side] = scores[side] * calibration["scale"]
        np.savez(work / VAL_SCORES, **scores)
    return {"model": str(export / "merged"), "run": name, "logs": str(out / "logs"), "final_step": result.metrics["step"],
            # every validation metric: a Tune trial's return value is its last result, ranked by any of them
            **{k: v for k, v in best_metrics.items() if k.startswith("val_") or k == "step"}}
