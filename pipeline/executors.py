"""Ray executors of the per-image stages: ``maps.executor: ray`` and ``refine.executor: ray``.

``make_maps``: a pool of actors (``ray_actors``; ``ray.map_actors``, by default one per GPU of the cluster, each
with ``gpus_per_actor`` = 1, or without GPUs one per ``cpus_per_actor`` CPUs), each loading the classifier
once; the images go to them in shards of ``ray.shard_size``. ``refine``: one CPU task (``ray_tasks``;
``ray.cpus_per_task``) per shard of images. The stages pass the per-image function they run. Workers read
their inputs (the images, the run folder's ``classifier.pt`` and maps) at the paths the driver gives, and
send their results back: this process writes every output through the same functions as a local run, so a
Ray run and a local run give files of the same bytes (with the same thread count per worker for the maps:
float sums may depend on it), and the run folder's atomic writes, resume and Ctrl-C behave as they do locally.

Where Ray runs (``ray.address``):
- ``null``: a local Ray instance is started for the stage (``ray.num_cpus`` CPUs, default all) and stopped
  after it;
- ``auto``: the cluster this machine joined with ``ray start --address <head>:6379``;
- ``ray://<head>:10001``: a remote cluster through Ray Client.
On a cluster of several machines, the dataset and the run folder must be readable at the same paths on
every node (a shared filesystem), and every node needs this package and its dependencies installed, or
``ray.ship_code: true`` to send the ``pipeline`` package with the job (its dependencies must still be there).

Ray is an optional extra (``pip install '.[ray]'``), imported only when an executor is ray.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config import RayConfig
from pipeline.errors import ConfigError, UserError, first_line

log = logging.getLogger(__name__)


def import_ray(key: str) -> Any:
    """The ``ray`` module, or a one-line ``ConfigError`` naming ``key`` when it is not installed."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"config key '{key}': executor ray needs the ray package, which is not installed; "
                          f"install it with pip install '.[ray]' (or pip install 'ray[client]'), or set {key}: local"
                          ) from None
    return ray


def _check_reachable(address: str) -> None:
    """Ray waits minutes for a cluster address that nobody answers at (e.g. ``auto`` finding the address file
    a killed cluster left in /tmp/ray): fail in seconds with the address instead."""
    target = address.removeprefix("ray://")
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address("auto") or ""
        except Exception:  # noqa: BLE001 - no cluster found (ray.init says so), or another Ray version
            return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: left to ray.init
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"config key 'ray.address': nothing answers at {target} ({exc.strerror or exc}); "
                          "is the Ray cluster up?") from None


@contextmanager
def ray_session(rc: RayConfig, key: str) -> Iterator[Any]:
    """Ray, connected as ``rc.address`` says. A session already open (``ray.init`` called before) is used
    as it is and left open; one opened here is shut down at the end."""
    ray = import_ray(key)
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if rc.address is None:
        kwargs.update(num_cpus=rc.num_cpus, include_dashboard=False)
    if rc.ship_code:
        kwargs["runtime_env"] = {"py_modules": [str(Path(pipeline.__file__).parent)]}  # uploaded to the cluster
    where = rc.address or "a new local instance"
    if rc.address is not None:
        _check_reachable(rc.address)
    try:
        ray.init(address=rc.address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - no cluster there, a refused connection, a bad address...
        raise ConfigError(f"config key 'ray.address': cannot start or reach Ray at {where} "
                          f"({first_line(exc)})") from None
    log.info("ray: %s, %s", where, {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})
    try:
        yield ray
    finally:
        ray.shutdown()


def executor_session(executor: str, rc: RayConfig, key: str) -> AbstractContextManager:
    """What a stage opens before it touches its outputs: a Ray session for executor ray (so that a missing
    package or an unreachable cluster fails before anything is removed), nothing for local."""
    return ray_session(rc, key) if executor == "ray" else nullcontext()


@dataclass
class _Failure:
    """A user error raised in a worker, sent back to be raised here as the one line it is."""

    error: UserError


def _results(out: Any) -> Any:
    if isinstance(out, _Failure):
        raise out.error
    return out


def shards(n: int, size: int) -> list[list[int]]:
    """``range(n)`` cut into consecutive shards of ``size`` (at least 1) indices."""
    size = max(1, size)
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


# ----------------------------------------------------------------------------- actors and tasks
# The stages give the per-item function they run; this module knows nothing of maps or refiners, so the
# dependency points one way (pipeline.maps.generate and pipeline.refine.runner -> here).


class _Actor:
    """A Ray actor that builds its per-item function once, ``factory(*args)`` (e.g. a classifier loaded on the
    actor's device), and runs it over shards of items."""

    def __init__(self, factory: Callable[..., Callable[[Any], Any]], args: tuple):
        self.fn, self.error = None, None
        try:
            self.fn = factory(*args)
        except UserError as exc:
            self.error = exc

    def run(self, items: list[tuple[int, Any]]) -> list[tuple[int, Any]] | _Failure:
        return _Failure(self.error) if self.error is not None else _run_shard(self.fn, items)


def ray_actors(factory: Callable[..., Callable[[Any], Any]], args: tuple, jobs: list, rc: RayConfig, key: str,
               device_name: str) -> Iterator[tuple[Any, Any]]:
    """(job, ``fn(job)``) for each of ``jobs``, in the order they finish, on a pool of Ray actors each holding
    ``fn = factory(*args)``: one per GPU of the cluster (``gpus_per_actor``), or without GPUs one per
    ``cpus_per_actor`` CPUs, at most ``map_actors``. ``key`` names the executor's config key in errors."""
    if not jobs:
        return
    with ray_session(rc, key) as ray:
        from ray.util import ActorPool

        resources = ray.cluster_resources()
        gpus = rc.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) > 0 and device_name != "cpu" else 0.0
        fits = int(resources.get("CPU", 1) // max(rc.cpus_per_actor, 1e-9))
        if gpus > 0:
            fits = min(fits, int(resources.get("GPU", 0) // gpus))
        parts = shards(len(jobs), rc.shard_size)
        n = min(rc.map_actors or fits, fits, len(parts))
        if n < 1:
            raise ConfigError(f"config key 'ray.gpus_per_actor': an actor needs {rc.cpus_per_actor} CPUs and {gpus} "
                              f"GPUs, the Ray cluster has {resources.get('CPU', 0)} and {resources.get('GPU', 0)}")
        log.info("%s: %d Ray actors (%s CPU, %s GPU each), %d shards", key, n, rc.cpus_per_actor, gpus, len(parts))
        actor = ray.remote(num_cpus=rc.cpus_per_actor, num_gpus=gpus)(_Actor)
        actors = [actor.remote(factory, args) for _ in range(n)]
        try:
            pool = ActorPool(actors)
            for part in parts:
                pool.submit(lambda a, shard: a.run.remote(shard), [(i, jobs[i]) for i in part])
            while pool.has_next():
                for i, result in _results(pool.get_next_unordered()):
                    yield jobs[i], result
        finally:
            for a in actors:
                ray.kill(a)


def _run_shard(fn: Callable[[Any], Any], items: list[tuple[int, Any]]) -> list[tuple[int, Any]] | _Failure:
    try:
        return [(i, fn(item)) for i, item in items]
    except UserError as exc:
        return _Failure(exc)


def ray_tasks(fn: Callable[[Any], Any], jobs: list, rc: RayConfig, key: str) -> Iterator[tuple[Any, Any]]:
    """(job, ``fn(job)``) for each of ``jobs``, computed by Ray CPU tasks (``cpus_per_task``) over shards of
    ``shard_size``, in the order they finish."""
    if not jobs:
        return
    with ray_session(rc, key) as ray:
        task = ray.remote(num_cpus=rc.cpus_per_task)(_run_shard)
        pending = [task.remote(fn, [(i, jobs[i]) for i in part]) for part in shards(len(jobs), rc.shard_size)]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for i, result in _results(ray.get(done[0])):
                    yield jobs[i], result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
