"""The config schema: YAML + dotted overrides, and errors that name the key."""

import functools
import math
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Union, get_args, get_origin

import annotated_types
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ray_crm.config import Config, ConfigError, SearchSpace, dump_config, load_config, validate


def test_defaults_are_the_papers_lora_settings():
    cfg = load_config()
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.train.lr) == (64, 128, 1e-4)


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nloss:\n  type: crm\n  lambda_mmd: 1.0\n")
    cfg = load_config(path, ["loss.lambda_mmd=0.3", "model.lora.rank=8", "loss.mmd.bandwidth=[0.5, 1.0]"])
    assert cfg.name == "x" and cfg.loss.type == "crm"
    assert cfg.loss.lambda_mmd == 0.3 and cfg.model.lora.rank == 8
    assert cfg.loss.mmd.bandwidth == [0.5, 1.0]


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'loss.lamda_mmd'; did you mean 'loss.lambda_mmd'\?"):
        load_config(None, ["loss.lamda_mmd=0.3"])
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'trian'; did you mean 'train'\?"):
        load_config(path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'train.num_workers': .*integer.*'two'"):
        load_config(None, ["train.num_workers=two"])
    with pytest.raises(ConfigError, match=r"'loss.mmd.bandwidth'"):
        load_config(None, ["loss.mmd.bandwidth=wide"])
    with pytest.raises(ConfigError, match=r"'loss.variant'"):
        load_config(None, ["loss.variant=sideways"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["loss.lambda_mmd"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["loss.type=crm", "loss.mmd.bandwidth=2.0"])
    path = tmp_path / "back.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert isinstance(Config().stage_dir("prepare").name, str)


def test_scientific_notation_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-4\n")
    assert load_config(path).train.lr == 5e-4
    assert load_config(None, ["train.lr=3E-5"]).train.lr == 3e-5


def test_a_dotted_override_indexes_a_list_and_names_a_bad_index():
    cfg = load_config(None, ["data.spurious=[{name: length, kind: length, bins: 10}]", "data.spurious.0.bins=30"])
    assert cfg.data.spurious[0].bins == 30
    with pytest.raises(ConfigError, match=r"data.spurious.3.bins.*not an index of a 1-item list"):
        load_config(None, ["data.spurious=[{name: length, kind: length}]", "data.spurious.3.bins=30"])


def test_a_swept_data_key_must_take_listed_values():
    from ray_crm.tune.sweep import check_space

    cfg = load_config(None, ["data.spurious=[{name: length, kind: length}]",
                             "sweep.space={data.spurious.0.bins: {uniform: [10, 30]}}"])
    with pytest.raises(ConfigError, match=r"sweep.space.data.spurious.0.bins: a data key .* grid or choice"):
        check_space(cfg)
    check_space(cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={
        "space": {"data.spurious.0.bins": SearchSpace(grid=[10, 20, 30])}})}))


def test_a_sweep_metric_the_trainer_never_reports_fails_before_any_trial():
    from ray_crm.tune.sweep import check_space

    space = ["loss.type=crm", "sweep.space={loss.lambda_mmd: {grid: [1.0]}}"]
    z = "data.spurious=[{name: concept, kind: concept, column: concept}]"
    check_space(load_config(None, [z, *space, "sweep.bias_metric=val_spearman_concept"]))
    with pytest.raises(ConfigError, match=r"sweep.bias_metric='val_spearman_length' is not a metric"):
        check_space(load_config(None, [z, *space, "sweep.bias_metric=val_spearman_length"]))


def test_an_rl_sweep_ranks_by_rl_metrics_and_refuses_data_keys():
    from ray_crm.tune.sweep import check_space

    rl = ["sweep.stage=train-rl", "reward.gold=[{name: vader, kind: vader}]", "sweep.metric=gold_vader_mean",
          "sweep.bias_metric=response_tokens_mean", "sweep.space={rl.gr_gamma: {grid: [0.0, 0.01]}}"]
    check_space(load_config(None, rl))
    with pytest.raises(ConfigError, match=r"sweep.metric='val_accuracy' is not a metric"):
        check_space(load_config(None, [*rl, "sweep.metric=val_accuracy"]))
    with pytest.raises(ConfigError, match=r"gr/g1_norm"):  # only GR reports the gradient norms
        check_space(load_config(None, [*rl, "rl.regularizer=kl", "sweep.bias_metric=gr/g1_norm"]))
    with pytest.raises(ConfigError, match=r"sweep.space.data.split.seed: train-rl reads no prepared data"):
        check_space(load_config(None, [*rl, "sweep.space={data.split.seed: {grid: [1, 2]}}"]))


UNUSED = {  # a setting the chosen type ignores -> the key the error names, and the switch it blames
    ("loss.lambda_mmd=0.3",): ("loss.lambda_mmd", "loss.type=bt"),
    ("loss.mmd.on=representation",): ("loss.mmd.on", "loss.type=bt"),
    ("loss.mmd.z_kernel=rbf",): ("loss.mmd.z_kernel", "loss.type=bt"),
    ("loss.type=crm", "loss.mmd.z_kernel=rbf", "loss.mmd.unbiased=true"): ("loss.mmd.unbiased", "z_kernel=rbf has none"),
    ("loss.type=crm", "loss.mmd.z_kernel=rbf", "data.spurious=[{name: who, kind: demographic}]"): (
        "loss.mmd.z_kernel", "who are categories"),
    ("loss.type=dpo", "loss.lambda_warmup=0.2"): ("loss.lambda_warmup", "no penalty to ramp in"),
    ("rl.regularizer=kl", "rl.gr_gamma=0.5"): ("rl.gr_gamma", "only rl.regularizer=gr"),
    ("rl.regularizer=none", "rl.gr_fd_eps=0.1"): ("rl.gr_fd_eps", "only rl.regularizer=gr"),
    ("rl.regularizer=reset", "rl.gr_g_clip=1.0"): ("rl.gr_g_clip", "only rl.regularizer=gr"),
    ("rl.regularizer=kl", "rl.gr_clip=separate"): ("rl.gr_clip", "only rl.regularizer=gr"),
    ("rl.kl_beta=0.1",): ("rl.kl_beta", "only rl.regularizer=kl or reset"),
    ("rl.regularizer=kl", "rl.reset_every=10"): ("rl.reset_every", "only rl.regularizer=reset"),
    ("rl.advantage=gae", "rl.pack_tokens=256"): ("rl.pack_tokens", "runs GAE along each row"),
    ("train.zero_stage=0", "train.offload=true"): ("train.offload", "ZeRO stage 0"),
    ("sweep.grace_period=3",): ("sweep.grace_period", "only sweep.scheduler=asha"),
    ("reward.gold=[{name: v, kind: vader, model: rm}]",): ("reward.gold.0.model", "kind vader"),
    ("data.spurious=[{name: z, kind: column, column: z, bins: 5}]",): ("data.spurious.0.bins", "discrete Z"),
    ("data.paths={train: [a.jsonl]}", "data.split.seed=3"): ("data.split.seed", "data.paths names the splits"),
    ("data.columns.split=fold", "data.split.by=pair"): ("data.split.by", "data.columns.split holds the splits"),
}


@pytest.mark.parametrize("overrides", UNUSED, ids=[key for key, _ in UNUSED.values()])
def test_a_setting_the_chosen_type_ignores_fails_at_load_naming_the_key(overrides):
    key, why = UNUSED[overrides]
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}': [^;]*{re.escape(why)}"):
        load_config(None, list(overrides))


def test_settings_the_chosen_type_reads_and_repeated_defaults_load():
    legal = [["loss.type=crm", "loss.lambda_mmd=0.0"], ["loss.variant=conditional", "loss.mmd.bandwidth=2.0"],
             ["rl.regularizer=gr", "rl.gr_gamma=0.5", "rl.gr_clip=separate"], ["rl.regularizer=reset", "rl.kl_beta=0.1",
             "rl.reset_every=10"], ["rl.regularizer=kl", "rl.gr_gamma=0.01"], ["sweep.scheduler=asha", "sweep.grace_period=3"],
             ["data.spurious=[{name: z, kind: column, column: z, bins: 5, discrete: false}]"],
             ["loss.type=crm", "loss.mmd.z_kernel=rbf", "data.spurious=[{name: p, kind: sycophancy}, {name: n, kind: length}]"]]
    for overrides in legal:
        load_config(None, overrides)
    # a dumped config repeats every default, also those the chosen type ignores: it reads back
    for overrides in (["rl.regularizer=none"], ["train.zero_stage=0"], ["data.paths={train: [a.jsonl]}"]):
        cfg = load_config(None, overrides)
        assert validate(yaml.safe_load(dump_config(cfg))) == cfg
    assert load_config().rl.gr_clip == "shared"


def test_a_sweep_of_a_setting_the_chosen_type_ignores_fails_before_any_trial():
    from ray_crm.tune.sweep import check_space

    rl = ["sweep.stage=train-rl", "reward.gold=[{name: vader, kind: vader}]", "sweep.metric=gold_vader_mean",
          "sweep.bias_metric=response_tokens_mean", "rl.regularizer=kl", "sweep.space={rl.gr_gamma: {grid: [0.1]}}"]
    with pytest.raises(ConfigError, match=r"sweep.space.rl.gr_gamma=0.1: 'rl.gr_gamma': only rl.regularizer=gr"):
        check_space(load_config(None, rl))


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_sweep_space_fits_the_schema(path):
    from ray_crm.tune.sweep import check_space

    cfg = load_config(path)
    if cfg.sweep.space:
        check_space(cfg)


def test_non_finite_and_out_of_range_values_fail_at_load_naming_the_key():
    cases = {
        "train.lr=.nan": "train.lr", "rl.lr=.inf": "rl.lr", "loss.lambda_mmd=-.inf": "loss.lambda_mmd",
        "rl.gr_gamma=.nan": "rl.gr_gamma", "rl.kl_beta=.inf": "rl.kl_beta", "train.max_steps=-2": "train.max_steps",
        "ray.num_cpus=0": "ray.num_cpus", "loss.mmd.bandwidth=[]": "loss.mmd.bandwidth",
        "loss.mmd.bandwidth=[1.0, .nan]": "loss.mmd.bandwidth", "loss.mmd.bandwidth=0.0": "loss.mmd.bandwidth",
        "loss.mmd.bandwidth=[1.0, -2.0]": "loss.mmd.bandwidth", "sweep.space.lr.uniform=[0.0, .inf]": "sweep.space.lr",
    }
    for override, key in cases.items():
        with pytest.raises(ConfigError, match=rf"'{re.escape(key)}"):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"'data.spurious.0.bins': .*greater than or equal to 2"):  # MMD of one bin: 0
        load_config(None, ["data.spurious=[{name: length, kind: length, bins: 1}]"])
    assert load_config(None, ["train.max_steps=-1", "loss.mmd.bandwidth=median"]).train.max_steps == -1


@pytest.mark.parametrize("name", ["a/b", "..", "../up", "a\\b", "", "."])
def test_a_run_name_is_one_folder_name(name):
    with pytest.raises(ConfigError, match=r"'name': .*folder name"):
        validate({"name": name})


def test_checkpoint_metric_is_checked_at_load_against_what_train_rm_reports():
    with pytest.raises(ConfigError, match=r"'train.checkpoint_metric': .*did you mean 'val_accuracy'.*'val_acuracy'"):
        load_config(None, ["train.checkpoint_metric=val_acuracy"])
    with pytest.raises(ConfigError, match=r"'train.checkpoint_metric'"):  # reported only with twins to score
        load_config(None, ["train.checkpoint_metric=val_ci_gap_std"])
    cfg = load_config(None, ["train.checkpoint_metric=val_ci_gap_std", "data.twins=/data/twins.parquet"])
    assert cfg.train.checkpoint_metric == "val_ci_gap_std"
    z = "data.spurious=[{name: concept, kind: concept, column: concept}]"
    assert load_config(None, [z, "train.checkpoint_metric=val_spearman_concept"]).data.spurious[0].name == "concept"


# Sections inside lists need an item to reach their fields: the smallest valid one of each.
LIST_ITEMS = {"data.spurious": "{name: length, kind: length}", "reward.gold": "{name: vader, kind: vader}"}


def _members(annotation) -> tuple:
    """The types of a union (X | None -> X, None), else the annotation alone."""
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)


def _numeric_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, FieldInfo, str | None]]:
    """(dotted key, field, base override) of every int/float field reachable through sections, sections that
    may be None and lists of sections (through their item 0)."""
    found = []
    for name, field in model.model_fields.items():
        key, args = f"{prefix}{name}", _members(field.annotation)
        if int in args or float in args or any(get_origin(a) is Annotated and get_args(a)[0] is float for a in args):
            found.append((key, field, None))
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                found += _numeric_fields(arg, f"{key}.")
            elif get_origin(arg) is list and isinstance(item := get_args(arg)[0], type) and issubclass(item, BaseModel):
                assert key in LIST_ITEMS, f"{key}: a list of sections with no item for the fuzz test"
                found += [(k, f, f"{key}=[{LIST_ITEMS[key]}]") for k, f, _ in _numeric_fields(item, f"{key}.0.")]
    return found


NUMERIC_FIELDS = _numeric_fields()


_CHECKS = {annotated_types.Gt: lambda v, b: v > b.gt, annotated_types.Ge: lambda v, b: v >= b.ge,
           annotated_types.Lt: lambda v, b: v < b.lt, annotated_types.Le: lambda v, b: v <= b.le}


def _bounds(field: FieldInfo) -> list:
    """The field's numeric constraints, including those of a constrained float inside a union (bandwidth)."""
    inner = [m for a in _members(field.annotation) if get_origin(a) is Annotated for f in get_args(a)[1:]
             for m in getattr(f, "metadata", [])]
    return [m for m in [*field.metadata, *inner] if type(m) in _CHECKS]


def _allowed(value: float, bounds: list) -> bool:
    return math.isfinite(value) and all(_CHECKS[type(b)](value, b) for b in bounds)


def _yaml_number(value: float) -> str:
    """A number as YAML spells it on the command line: .nan, .inf, -.inf, or Python's repr."""
    if math.isnan(value):
        return ".nan"
    return (".inf" if value > 0 else "-.inf") if math.isinf(value) else repr(value)


def test_the_fuzz_test_reaches_every_kind_of_numeric_field():
    keys = {k for k, _, _ in NUMERIC_FIELDS}
    assert {"train.lr", "rl.gr_gamma", "loss.lambda_mmd", "loss.mmd.bandwidth", "ray.num_cpus", "train.max_steps",
            "data.spurious.0.bins", "data.vader.min_gap", "model.lora.dropout", "rl.lora.rank"} <= keys
    assert not {"train.use_gpu", "name", "loss.type"} & keys  # bools, strings and literals are not numbers
    assert _allowed(1.0, []) and not _allowed(math.nan, []) and not _allowed(0.0, [annotated_types.Gt(0.0)])


@settings(max_examples=40, deadline=None, database=None)
@given(value=st.one_of(st.integers(max_value=0), st.floats(max_value=0.0), st.sampled_from([math.inf, math.nan])))
@example(value=math.nan)
@example(value=math.inf)
@example(value=-math.inf)
@example(value=0)
@example(value=0.0)
@example(value=-1)
@example(value=-1e-300)
def test_a_numeric_key_set_to_zero_negative_or_non_finite_is_refused_by_name_or_kept_within_its_bounds(value):
    for key, field, base in NUMERIC_FIELDS:
        override = f"{key}={_yaml_number(value)}"
        try:
            cfg = load_config(None, [*([base] if base else []), override])
        except ConfigError as exc:
            assert f"'{key}'" in str(exc), f"{override}: the error does not name the key: {exc}"
            continue
        kept = functools.reduce(lambda node, part: node[int(part)] if part.isdigit() else getattr(node, part),
                                key.split("."), cfg)
        assert kept == value and _allowed(kept, _bounds(field)), f"{override} was accepted as {kept!r}"


def test_overriding_one_rl_lora_key_keeps_the_other_rl_defaults():
    cfg = load_config(None, ["rl.lora.rank=8"])
    assert (cfg.rl.lora.rank, cfg.rl.lora.alpha) == (8, 32)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (64, 128)


def test_dpo_family_settings_are_checked_across_sections():
    from ray_crm.config import ConfigError, pair_stage, validate

    assert pair_stage(validate({"loss": {"type": "causal_dpo", "lambda_mmd": 0.1}})) == "train-dpo"
    assert pair_stage(validate({"loss": {"type": "crm", "lambda_mmd": 0.1}})) == "train-rm"
    with pytest.raises(ConfigError, match="loss.beta.*trains a reward head"):
        validate({"loss": {"type": "bt", "beta": 0.5}})
    with pytest.raises(ConfigError, match="loss.lambda_mmd.*loss.type=dpo trains without the MMD penalty"):
        validate({"loss": {"type": "dpo", "lambda_mmd": 0.1}})
    with pytest.raises(ConfigError, match="model.lora.enabled.*adapter disabled"):
        validate({"loss": {"type": "dpo"}, "model": {"lora": {"enabled": False}}})
    validate({"loss": {"type": "dpo", "reference": "precomputed"}, "model": {"lora": {"enabled": False}}})
    with pytest.raises(ConfigError, match="loss.reference.*no reference model"):
        validate({"loss": {"type": "crm", "reference": "precomputed"}})
    with pytest.raises(ConfigError, match="sweep.stage.*trains with train-dpo"):
        validate({"loss": {"type": "causal_dpo"}, "sweep": {"stage": "train-rm",
                                                             "space": {"loss.lambda_mmd": {"grid": [0, 1]}}}})


def test_held_out_evaluation_settings_need_held_out_prompts_and_do_not_block_a_resume():
    from ray_crm.rl.grpo_trainer import RESUMABLE_KEYS, reported_metric_names

    with pytest.raises(ConfigError, match="rl.eval_every.*only read with rl.eval_prompts set"):
        load_config(None, ["rl.eval_every=5"])
    cfg = load_config(None, ["rl.eval_prompts=[held_out.jsonl]", "rl.eval_every=5",
                             "reward.gold=[{name: vader, kind: vader}]"])
    assert {"eval/gold_vader_mean", "eval/reward_mean"} <= reported_metric_names(cfg)  # a sweep may choose by them
    assert {"rl.eval_prompts", "rl.eval_every", "rl.eval_samples"} <= RESUMABLE_KEYS


def test_an_rl_trial_larger_than_the_local_cluster_is_refused_naming_the_knobs():
    from ray_crm.tune.sweep import check_trial_fits

    rl = ["sweep.stage=train-rl", "reward.model=some-rm", "rollout.cpus_per_engine=1.0", "rl.learner_cpus=0.5",
          "reward.gold=[{name: vader, kind: vader}, {name: gold_rm, kind: reward_model, model: other-rm}]"]
    with pytest.raises(ConfigError, match=r"reserves 2.26 CPUs .*reward.cpus_per_actor.* cluster has 2"):
        check_trial_fits(load_config(None, [*rl, "reward.cpus_per_actor=0.25"]), 2.0)
    check_trial_fits(load_config(None, [*rl, "reward.cpus_per_actor=0.15"]), 2.0)
    check_trial_fits(load_config(None, [*rl, "reward.cpus_per_actor=0.25"]), 4.0)


def test_a_sweep_whose_trials_all_failed_says_why_each_failed():
    from types import SimpleNamespace

    from ray_crm.tune.sweep import results_table

    cfg = load_config(None, ["loss.type=crm", "sweep.space={loss.lambda_mmd: {grid: [1.0, 3.0]}}"])
    grid = [SimpleNamespace(metrics={"step": 0}, path=f"/runs/trial_{i}", config={"loss.lambda_mmd": lam},
                            error=RuntimeError(f"Traceback ...\nActorCallError: rollout-0 did not start within {i} s"))
            for i, lam in enumerate([1.0, 3.0])]
    with pytest.raises(RuntimeError, match=r"no trial .* reported val_accuracy .*2 failed: trial_0: .*within 0 s; "
                                           r"trial_1: ActorCallError: rollout-0 did not start within 1 s"):
        results_table(grid, cfg)
    grid[1] = SimpleNamespace(metrics={"val_accuracy": 0.8, cfg.sweep.bias_metric: 0.1}, path="/runs/trial_1",
                              config={"loss.lambda_mmd": 3.0}, error=None)
    table, chosen = results_table(grid, cfg)
    assert chosen == 1 and list(table["status"]) == ["ERROR", "DONE"]
