"""Ray actors that mine shards, fed from a dynamic queue by the driver.

Following Ray's batch-inference pattern: the model loads once per actor in `__init__`; one
coarse `mine(shard)` call per shard; results are consumed in completion order with
`ray.wait`; actors write files themselves and return a small marker dict.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tqdm import tqdm

from .errors import UserError
from .shards import Shard
from .spec import JobSpec
from .store import Store


class MinerActor:
    """Wrapped with ray.remote at start-up so importing this module never needs Ray running."""

    def __init__(self, job: dict[str, Any], store: str, threads: int):
        import torch

        from .engine import ShardMiner
        from .models import load_model
        from .spec import spec_from_dict

        torch.set_num_threads(threads)  # results and speed must not depend on the host's core count
        _quiet_transformers()
        self.spec = spec_from_dict(job)
        self.miner = ShardMiner(self.spec, load_model(self.spec.model))
        self.store = Store(store)

    def mine(self, shard: Shard) -> dict[str, Any]:
        try:
            result = self.miner.mine(shard)
            return self.store.write_shard(result, {"first_tok": shard.first_tok, "contexts": len(shard.ids),
                                                   "worker": os.getpid()})
        except UserError as e:
            return {"shard": shard.index, "status": "error", "error": str(e)}

    def ready(self) -> bool:
        return True


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:  # embedded local cluster: loopback only, no dashboard
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 _node_ip_address="127.0.0.1")


def actor_count(spec: JobSpec, n_shards: int) -> tuple[int, int]:
    """(actors, gpus per actor)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    wants_gpu = spec.model.device != "cpu" and gpus > 0
    if spec.compute.actors == "auto":
        n = gpus if wants_gpu else max(1, int(resources.get("CPU", 1)) // spec.compute.cpus_per_actor)
    else:
        n = int(spec.compute.actors)
    return max(1, min(n, n_shards)), (1 if wants_gpu else 0)


def mine_on_ray(spec: JobSpec, store: Store, shards: list[Shard], *, total_tokens: int, done_tokens: int,
                address: str | None, progress: bool) -> None:
    if not shards:
        return
    import ray

    start_ray(address)
    n_actors, gpus = actor_count(spec, len(shards))
    remote = ray.remote(num_cpus=spec.compute.cpus_per_actor, num_gpus=gpus)(MinerActor)
    actors = [remote.remote(spec.to_dict(), str(store.root.resolve()), spec.compute.cpus_per_actor)
              for _ in range(n_actors)]
    queue = list(reversed(shards))
    running: dict[Any, tuple[Any, Shard]] = {}
    bar = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, disable=not progress,
               desc=f"mining ({n_actors} actor{'s' if n_actors > 1 else ''})", dynamic_ncols=True, mininterval=1.0)
    try:
        for actor in actors:
            if queue:
                shard = queue.pop()
                running[actor.mine.remote(shard)] = (actor, shard)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            actor, shard = running.pop(ref)
            try:
                marker = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise UserError(f"shard {shard.index} failed: {_first_line(e)}") from None
            if marker.get("status") == "error":
                raise UserError(marker["error"])
            bar.update(shard.n_tokens)
            if queue:
                nxt = queue.pop()
                running[actor.mine.remote(nxt)] = (actor, nxt)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)


def _quiet_transformers() -> None:
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # RayTaskError text ends with the original exception; its last line says what happened
    return (lines[-1] if lines else type(e).__name__)[:300]
