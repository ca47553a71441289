"""Shared fixtures: tiny models built from configs, one local Ray cluster per session, offline HF."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the session's local Ray cluster binds 127.0.0.1 only


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def ray_local():
    """One local 2-CPU Ray cluster for the whole session (start-up costs seconds)."""
    import ray

    from ray_crm.config import RayConfig
    from ray_crm.runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()
