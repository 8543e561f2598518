"""Ray actors that mine shards, fed from a dynamic queue by the driver.

Following Ray's batch-inference pattern: the model loads once per actor in `__init__`; one
coarse `mine(shard)` call per shard; results are consumed in completion order with
`ray.wait`; actors write files themselves and return a small marker dict.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from tqdm import tqdm

from .errors import UserError
from .gc_pause import gc_paused
from .shards import Shard
from .spec import JobSpec
from .store import Store


class MinerActor:
    """Wrapped with ray.remote at start-up so importing this module never needs Ray running."""

    def __init__(self, job: dict[str, Any], store: str, threads: int, token_groups: list[int] | None = None):
        # numba sizes its kernel thread pool once, at import, from the host's cores: an actor's pool must be
        # its own share, or idle kernel threads spin on the cores other actors compute on (2 actors on 2
        # cores ran 2.2x slower). Nothing has imported numba in this process yet (engine does, below).
        os.environ["NUMBA_NUM_THREADS"] = str(threads)
        with gc_paused():  # torch's, transformers' and the model's million objects: no collector passes over them
            self._load(job, store, threads, token_groups)
        # With two calls in flight (write_slots), one shard's files are written while the next one mines:
        # the model runs one shard at a time, the writes (host copies, compression, disk) run beside it.
        self._mining = threading.Lock()
        self._floors = threading.Lock()

    def _load(self, job: dict[str, Any], store: str, threads: int, token_groups: list[int] | None) -> None:
        import torch

        from .engine import ShardMiner
        from .models import load_model
        from .spec import spec_from_dict

        torch.set_num_threads(threads)  # results and speed must not depend on the host's core count
        from .models import quiet_transformers

        quiet_transformers()
        self.spec = spec_from_dict(job)
        if self.spec.is_diff:
            from .diff import DiffMiner

            self.miner = DiffMiner(self.spec, load_model(self.spec.models["a"]), load_model(self.spec.models["b"]))
        else:
            self.miner = ShardMiner(self.spec, load_model(self.spec.model), token_groups)
        self.store = Store(store)

    def mine(self, shard: Shard, attempt: int = 0) -> dict[str, Any]:
        """Mine one shard and write its files; any failure comes back as a marker, not an exception."""
        try:
            _injected_fault(shard.index, attempt)
            with self._mining:
                result = self.miner.mine(shard)
            marker = self.store.write_shard(result, {"first_tok": shard.first_tok, "contexts": len(shard.ids),
                                                     "attempts": attempt + 1, "worker": os.getpid()})
            with self._floors:
                self.miner.raise_floors(result)  # stored: from now on a lower bound for this actor's next shards
            return marker
        except Exception as e:  # noqa: BLE001 - reported per shard; the driver decides on retries
            return {"shard": shard.index, "status": "error", "error": f"{type(e).__name__}: {_first_line(e)}"}

    def fit_batch_size(self, shard: Shard, free_bytes: int | None = None) -> dict[str, Any]:
        """compute.batch_size auto: the batch that fills this actor's device (or `free_bytes` of it), measured
        on `shard`."""
        try:
            from .batch_fit import fit_batch_size

            _injected_fault("fit", 0)
            with self._mining:
                batch_size, how = fit_batch_size(self.miner, shard, free_bytes)
            return {"status": "complete", "batch_size": batch_size, "how": how}
        except Exception as e:  # noqa: BLE001
            return {"status": "error", "error": f"{type(e).__name__}: {_first_line(e)}"}

    def use_batch_size(self, batch_size: int) -> None:
        self.miner.batch_size = batch_size

    def free_memory(self) -> int | None:
        """Free bytes on this actor's GPU (None on CPUs)."""
        from .batch_fit import free_device_memory

        return free_device_memory(self.miner.loaded.device)

    def model_tables(self, names: list[str], inputs: dict[str, Any]) -> dict[str, Any]:
        """Tables about the model rather than the corpus (logit lens, head scores, coherence), written here."""
        try:
            from .model_tables import write_model_tables

            write_model_tables(self.miner, self.store, names, inputs)
            return {"status": "complete"}
        except Exception as e:  # noqa: BLE001
            return {"status": "error", "error": f"{type(e).__name__}: {_first_line(e)}"}

    def head_ablation(self, layer: int, input_ids: Any) -> dict[str, Any]:
        """The head_ablation rows of one layer's heads (zero and mean ablation) over input_ids."""
        try:
            from .model_tables import head_ablation_layer

            return {"status": "complete", "table": head_ablation_layer(self.miner, layer, input_ids)}
        except Exception as e:  # noqa: BLE001
            return {"status": "error", "error": f"{type(e).__name__}: {_first_line(e)}"}

    def ready(self) -> int:
        return os.getpid()


def _injected_fault(shard: int | str, attempt: int) -> None:
    """Test hook: MINING_INJECT_FAULT="fail:3" fails shard 3 on every attempt (a deterministic bad
    shard); "crash:3" kills the worker process mining shard 3 on its first attempt; "fail:fit" fails
    the batch size's measurement."""
    from .storage import injected_faults

    if str(shard) in injected_faults("fail"):
        raise RuntimeError(f"injected failure of shard {shard}")
    if str(shard) in injected_faults("crash") and attempt == 0:
        os._exit(1)


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        check_address(address)
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - connection, auth and version errors all mean "cannot join"
            raise UserError(f"--address {address}: cannot join the Ray cluster: {_first_line(e)} "
                            "(a token-auth cluster also needs RAY_AUTH_MODE=token)") from None
    else:  # embedded local cluster: loopback only, no dashboard
        _loopback_only()
        # "local": a cluster of its own. With no address, ray.init joins whatever RAY_ADDRESS or the machine's last
        # `ray start` (/tmp/ray/ray_current_cluster) names: another job's cluster, which may go away mid-run.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)


def check_address(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at the address."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except ValueError:
        raise UserError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT") from None
    except OSError as e:
        raise UserError(f"--address {address}: nothing answers there ({e.strerror or e}); is the cluster up?") from None


def _loopback_only() -> None:
    """Make an embedded cluster bind every server to 127.0.0.1. Ray turns an explicit 127.0.0.1
    node address into the host's routable IP unless it believes it is a single-machine
    (Windows/macOS-style) install; that switch is read from the environment by Ray's child
    processes and from `ray_constants` by this one."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # a future Ray without the switch: it then binds as it likes
        pass


def write_slots(gpus: int) -> int:
    """Calls in flight per actor: two on a GPU, so the next shard mines while the last one's files are
    written; one on CPUs, whose cores the mining already fills. MINING_ACTOR_SLOTS overrides (tests)."""
    return int(os.environ.get("MINING_ACTOR_SLOTS", 0)) or (2 if gpus else 1)


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


def actors_on_gpus(spec: JobSpec, address: str | None) -> bool:
    """Whether the job's actors will run on GPUs (actor_count's rule), without starting a local Ray."""
    if spec.model.device == "cpu":
        return False
    if address:
        import ray

        start_ray(address)
        return int(ray.cluster_resources().get("GPU", 0)) > 0
    import torch

    return torch.cuda.is_available()


@dataclass
class PoolReport:
    mined: int = 0
    retried: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    actors: int = 0
    seconds: float = 0.0
    """Wall time from the actors being ready (model loaded) to the last shard: the mining itself."""
    batch_size: int | None = None


def mine_on_ray(spec: JobSpec, store: Store, shards: list[Shard], *, total_tokens: int, done_tokens: int,
                address: str | None, progress: bool, model_tables: list[str] = (),
                token_groups: list[int] | None = None,
                after_shards: Callable[[], dict[str, Any]] | None = None,
                on_shard: Callable[[int], None] | None = None,
                on_batch_size: Callable[[int, dict[str, Any]], None] | None = None) -> PoolReport:
    """Feed shards to actors as they free up; retry shards whose attempt failed or whose worker
    (or node) died, up to compute.max_retries, then record them as failed and go on; `on_shard(index)`
    hears of each shard whose files and marker are written. A `compute.batch_size: auto` is chosen
    first, by one actor on the first shard, and handed to `on_batch_size(batch_size, how)`. Then
    `after_shards()` (the driver's merge) returns the inputs of the model-level tables, which the
    actors write: head_ablation spread layer by layer over every actor, the others on one."""
    report = PoolReport()
    if not shards and not model_tables:
        return report
    with gc_paused():  # Ray's imports
        import ray
        from ray.exceptions import RayActorError, RayError

        start_ray(address)
    n_actors, gpus = actor_count(spec, max(1, len(shards)))
    env = {k: v for k, v in os.environ.items() if k in ("MINING_INJECT_FAULT", "MINING_KERNELS")}
    slots = write_slots(gpus)
    remote = ray.remote(num_cpus=spec.compute.cpus_per_actor, num_gpus=gpus, max_concurrency=slots,
                        runtime_env={"env_vars": env} if env else None)(MinerActor)

    def new_actor():
        return remote.remote(spec.to_dict(), store.location, spec.compute.cpus_per_actor, token_groups)

    actors = [new_actor() for _ in range(n_actors)]
    try:
        ray.get([a.ready.remote() for a in actors])  # a model that cannot load fails here, once, clearly
    except RayError as e:
        for a in actors:
            ray.kill(a)
        raise UserError(f"actors could not start: {_first_line(e)}") from None
    report.actors = n_actors
    if spec.compute.fixed_batch_size is None and shards:
        try:
            spec = _fit_batch_size(spec, actors, shards[0], on_batch_size)  # replacement actors get the number
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
    report.batch_size = spec.compute.fixed_batch_size
    started = time.perf_counter()
    queue = deque(shards)
    attempts: dict[int, int] = {}
    idle = [a for a in actors for _ in range(slots)]  # one entry per call an actor may have in flight
    dead: set[Any] = set()
    running: dict[Any, tuple[Any, Shard]] = {}
    bar = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, disable=not progress,
               desc=f"mining ({n_actors} actor{'s' if n_actors > 1 else ''})", dynamic_ncols=True, mininterval=1.0)

    def status() -> None:
        bar.set_postfix_str(f"shards {report.mined}/{len(shards)} done, {len(report.failed)} failed, "
                            f"{report.retried} retried", refresh=False)

    def retry_or_fail(shard: Shard, error: str) -> None:
        attempts[shard.index] = attempts.get(shard.index, 0) + 1
        if attempts[shard.index] > spec.compute.max_retries:
            report.failed.append(store.write_failed(shard, error, attempts[shard.index]))
            bar.write(f"shard {shard.index} failed after {attempts[shard.index]} attempts: {error}")
        else:
            report.retried += 1
            queue.append(shard)  # to the back: other shards go first, maybe to another actor

    try:
        while queue or running:
            while idle and queue:
                actor, shard = idle.pop(), queue.popleft()
                running[actor.mine.remote(shard, attempts.get(shard.index, 0))] = (actor, shard)
            if not running:  # every actor died and none could be replaced
                raise UserError("no actors left to mine on (workers or nodes died); finish with `mine run --resume`")
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, shard = running.pop(ref)
            try:
                marker = ray.get(ref)
            except RayActorError as e:  # the worker process or its node died mid-shard
                retry_or_fail(shard, f"worker died: {_first_line(e)}")
                if actor not in dead:  # its other call in flight fails too: replace it once
                    dead.add(actor)
                    ray.kill(actor)
                    idle[:] = [a for a in idle if a is not actor]
                    if _room_for_actor(spec, gpus):
                        idle.extend([new_actor()] * slots)
                status()
                continue
            except RayError as e:
                marker = {"status": "error", "error": _first_line(e)}
            idle.append(actor)
            if marker.get("status") == "error":
                retry_or_fail(shard, marker["error"])
            else:
                report.mined += 1
                bar.update(shard.n_tokens)
                if on_shard:
                    on_shard(shard.index)
            status()
        report.seconds = time.perf_counter() - started
        inputs = after_shards() if after_shards else {}
        if model_tables and idle:
            bar.set_description_str(f"model tables ({', '.join(model_tables)})")
            _model_stage(store, list(dict.fromkeys(idle)), list(model_tables), inputs)
    finally:
        report.seconds = report.seconds or time.perf_counter() - started
        bar.close()
        for actor in dict.fromkeys(idle + [a for a, _ in running.values()]):
            ray.kill(actor)
    return report


def _model_stage(store: Store, actors: list[Any], names: list[str], inputs: dict[str, Any]) -> None:
    """One actor writes the single-pass tables while the others (then it too) ablate heads layer by layer."""
    import pyarrow as pa
    import ray

    tasks: deque = deque(("ablation", layer) for layer in inputs.get("ablation_layers", ()) if "head_ablation" in names)
    single = [n for n in names if n != "head_ablation"]
    if single:
        tasks.appendleft(("tables", single))
    idle, running, parts = list(actors), {}, {}
    while tasks or running:
        while idle and tasks:
            actor, (kind, arg) = idle.pop(0), tasks.popleft()
            ref = (actor.model_tables.remote(arg, inputs) if kind == "tables"
                   else actor.head_ablation.remote(arg, inputs["ablation_ids"]))
            running[ref] = (actor, kind, arg)
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, kind, arg = running.pop(ref)
        result = ray.get(ref)
        if result["status"] != "complete":
            what = ", ".join(arg) if kind == "tables" else f"head_ablation (layer {arg})"
            raise UserError(f"model tables {what} failed: {result['error']}")
        if kind == "ablation":
            parts[arg] = result["table"]
        idle.append(actor)
    if parts:
        store.write_table("head_ablation", pa.concat_tables([parts[layer] for layer in sorted(parts)]))


def _fit_batch_size(spec: JobSpec, actors: list[Any], shard: Shard,
                    record: Callable[[int, dict[str, Any]], None] | None) -> JobSpec:
    """One actor measures the batch size on `shard`, every actor takes it: it is the job's, not a device's."""
    import ray
    from ray.exceptions import RayError

    try:
        # on GPUs, the budget is the smallest free memory of any actor's device: the number is every actor's
        free = [m for m in ray.get([a.free_memory.remote() for a in actors]) if m is not None]
        result = ray.get(actors[0].fit_batch_size.remote(shard, min(free) if free else None))
        if result["status"] == "complete":
            ray.get([a.use_batch_size.remote(result["batch_size"]) for a in actors])
    except RayError as e:
        result = {"status": "error", "error": _first_line(e)}
    if result["status"] != "complete":
        raise UserError(f"compute.batch_size: auto could not be measured ({result['error']}); give a number "
                        "(--set compute.batch_size=N, with --resume: no shard was mined)")
    if record:
        record(result["batch_size"], result["how"])
    return spec.with_compute(batch_size=result["batch_size"])


def _room_for_actor(spec: JobSpec, gpus: int) -> bool:
    """Whether the cluster has free resources for a replacement actor right now (else the
    remaining actors finish the queue rather than waiting on one that may never start)."""
    import ray

    free = ray.available_resources()
    return free.get("CPU", 0) >= spec.compute.cpus_per_actor and free.get("GPU", 0) >= gpus


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # RayTaskError text ends with the original exception; its last line says what happened
    return (lines[-1] if lines else type(e).__name__)[:300]
