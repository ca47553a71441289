"""The config schema: YAML + dotted overrides, and errors that name the key."""

from pathlib import Path

import pytest

from ray_crm.config import Config, ConfigError, SearchSpace, dump_config, load_config


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

    space = "sweep.space={loss.lambda_mmd: {grid: [1.0]}}"
    z = "data.spurious=[{name: concept, kind: concept, column: concept}]"
    check_space(load_config(None, [z, space, "sweep.bias_metric=val_spearman_concept"]))
    with pytest.raises(ConfigError, match=r"sweep.bias_metric='val_spearman_length' is not a metric"):
        check_space(load_config(None, [z, space, "sweep.bias_metric=val_spearman_length"]))


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


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_sweep_space_fits_the_schema(path):
    from ray_crm.tune.sweep import check_space

    cfg = load_config(path)
    if cfg.sweep.space:
        check_space(cfg)
