"""The config schema: YAML + dotted overrides, and errors that name the key."""

import pytest

from ray_crm.config import Config, ConfigError, dump_config, load_config


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
