"""Process set-up shared by the driver and every Ray worker: thread counts, offline mode, Ray start."""

from __future__ import annotations

import os

from ray_crm.config import RayConfig

# On 2 cores, torch with 2 threads per process under contention ran 5-7x slower than with 1 (measured here).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM")


def worker_env(threads: int) -> dict[str, str]:
    """Environment every Ray worker starts with: fixed thread counts, no hub access."""
    env = {k: str(threads) for k in THREAD_ENV[:3]}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads in this process; call first thing in every worker and actor."""
    import torch

    torch.set_num_threads(threads)
    os.environ.update(worker_env(threads))


def starts_local_cluster(cfg: RayConfig) -> bool:
    return cfg.address is None and not os.environ.get("RAY_ADDRESS")


def keep_local_cluster_on_loopback(cfg: RayConfig) -> None:
    """A cluster started on this machine listens on 127.0.0.1 only, not the machine's network address.

    Ray reads this switch when it is imported, so call this before anything imports ray.
    """
    if starts_local_cluster(cfg):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(cfg: RayConfig) -> None:
    """Connect to `cfg.address` (or $RAY_ADDRESS, which Ray sets inside a job), or start a local cluster.

    Either way the workers inherit fixed thread counts.
    """
    import ray

    if ray.is_initialized():
        return
    env = worker_env(cfg.torch_threads)
    os.environ.update(env)
    local = starts_local_cluster(cfg)
    ray.init(
        address=cfg.address,
        num_cpus=cfg.num_cpus if local else None,
        runtime_env={"env_vars": env},
        include_dashboard=True if local else None,
        log_to_driver=True,
    )
