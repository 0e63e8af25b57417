"""Where an analysis's batches run: in this process (``local``) or on Ray actors (``ray``).

Every per-fact (or per-chunk) analysis goes through one loop, :func:`factscope.loop.resumable`:
it skips what its checkpoint holds, cuts the rest into batches, and appends each batch's records to
the checkpoint. The loop hands the batches to the *current executor* (:func:`current`, set by
:func:`using`; the CLI's ``--executor``): :class:`Local` runs them here, one after another;
:class:`RayExecutor` sends them to ``workers`` Ray actors. Each actor loads the model once (a
:class:`~factscope.models.Model` travels as the arguments that loaded it, see
:func:`_register_model`), runs the batch function on the batches it is given, and returns their
records; the driver receives them **in batch order** and appends them to the same checkpoint as the
local loop would, so the tables are the same, resume works across executors (start local, finish on
Ray, or the reverse) and a batch lost with a killed worker is retried (Ray restarts the actor and
reruns its task) without a duplicate record. With ``gpus_per_worker`` each actor gets that share of
a GPU and loads the model on ``cuda`` (two or more whole GPUs: split over them).

Ray is optional (``pip install 'factscope[ray]'``); without it ``--executor ray`` says how to
install it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from factscope.errors import FactscopeError

EXECUTORS = ("local", "ray")

# work(indices, report) -> records, as factscope.loop.Work
Work = Callable[[list[int], Callable[[float], None]], Sequence[Any]]


class Local:
    """Run the batches here, one after another (``report`` moves the progress bar within a batch)."""

    def map(self, work: Work, batches: Iterable[list[int]],
            report_for: Callable[[list[int]], Callable[[float], None]]) -> Iterator[tuple[list[int], list]]:
        for idx in batches:
            yield idx, list(work(idx, report_for(idx)))

    def close(self) -> None:
        pass


class RayExecutor:
    """Run the batches on ``workers`` Ray actors (a local Ray instance, or the cluster at
    ``address``), each with ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs. The actors live as
    long as the executor (:meth:`close`), so a command's analyses share their loaded models."""

    def __init__(self, workers: int = 2, address: str | None = None, gpus_per_worker: float = 0.0,
                 cpus_per_worker: float = 1.0, max_restarts: int = 3):
        if workers < 1:
            raise FactscopeError(f"--workers must be at least 1, got {workers}")
        if gpus_per_worker < 0 or cpus_per_worker <= 0:
            raise FactscopeError("--gpus-per-worker must be >= 0 and the CPUs per worker > 0")
        if gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker):
            raise FactscopeError(f"--gpus-per-worker {gpus_per_worker}: above 1 a worker takes whole GPUs "
                                 "(its model is split over them)")
        self.workers, self.address = workers, address
        self.gpus, self.cpus, self.max_restarts = gpus_per_worker, cpus_per_worker, max_restarts
        self._actors: list = []
        self._started_ray = False

    def _start(self):
        ray = ray_module()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address:
                kw["address"] = self.address
            else:
                kw["num_cpus"] = max(int(self.workers * self.cpus + 0.999), 1)
            try:
                ray.init(**kw)
            except ConnectionError as e:
                raise FactscopeError(f"--ray-address {self.address}: cannot connect to a Ray cluster ({e})") from None
            self._started_ray = True
        _register_model(ray, actor_device(self.gpus))
        if not self._actors:
            actor = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=self.max_restarts,
                               max_task_retries=self.max_restarts)(_Worker)
            self._actors = [actor.remote() for _ in range(self.workers)]
        return ray

    def map(self, work: Work, batches: Iterable[list[int]],
            report_for: Callable[[list[int]], Callable[[float], None]]) -> Iterator[tuple[list[int], list]]:
        batches = [list(b) for b in batches]
        if not batches:
            return
        ray = self._start()
        from ray.util import ActorPool

        ref = ray.put(work)  # stored once; a task unpickles it, its model comes from _LOADED after the first
        pool = ActorPool(self._actors)
        try:
            for idx, records in zip(batches, pool.map(lambda a, idx: a.run.remote(ref, idx), batches)):
                yield idx, records
        except ray.exceptions.RayError as e:
            raise FactscopeError(f"a Ray worker failed: {_ray_cause(e)}") from None

    def close(self) -> None:
        if not self._actors and not self._started_ray:
            return
        ray = ray_module()
        for a in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        self._actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


class _Worker:
    """A Ray actor: runs batch functions; its models stay loaded between calls (:data:`_LOADED`)."""

    def run(self, work: Work, idx: list[int]) -> list:
        return list(work(idx, lambda fraction: None))


def _ray_cause(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, FactscopeError):
        return str(cause)
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def ray_module():
    try:
        import ray
    except ImportError:
        raise FactscopeError("--executor ray needs Ray: pip install 'factscope[ray]' (or pip install ray)") from None
    return ray


# --------------------------------------------------------------------------------------------
# models travel as the arguments that loaded them

_LOADED: dict[tuple, Any] = {}


def _load_once(spec: str, device: str, dtype: str):
    """The model ``spec`` loaded once per process (a Ray actor runs many batches)."""
    key = (spec, device, dtype)
    if key not in _LOADED:
        from factscope.models import load_model

        _LOADED[key] = load_model(spec, device=device, dtype=dtype)
    return _LOADED[key]


def actor_device(gpus: float) -> str | None:
    """The device an actor with ``gpus`` GPUs loads its model on: its GPU, or with several whole
    GPUs the model split over them (Ray numbers an actor's GPUs from 0); None without a GPU."""
    if gpus <= 0:
        return None
    return "cuda" if gpus <= 1 else ",".join(f"cuda:{i}" for i in range(int(gpus)))


def _register_model(ray, device: str | None) -> None:
    """Ray sends a Model as ``(spec, device, dtype)`` and the actor loads it once (on ``device`` when
    given: the actor's GPU). A Model not loaded by :func:`factscope.models.load_model` (no ``origin``)
    cannot travel: one clear error."""
    from factscope.models import Model

    def serialize(m: Model):
        origin = getattr(m, "origin", None)
        if origin is None:
            raise FactscopeError(f"model {m.name} was not loaded by name (load_model), so Ray workers cannot load it; "
                                 "use --executor local")
        spec, dev, dtype = origin
        return spec, device or dev, dtype

    ray.util.register_serializer(Model, serializer=serialize, deserializer=lambda args: _load_once(*args))


# --------------------------------------------------------------------------------------------
# the current executor

_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("factscope_executor", default=None)


def current():
    """The executor of the running command (default: :class:`Local`)."""
    return _CURRENT.get() or Local()


@contextlib.contextmanager
def using(executor) -> Iterator[Any]:
    """Run the loops inside on ``executor`` (closed when the block ends)."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)
        executor.close()


def make(name: str = "local", workers: int = 2, address: str | None = None, gpus_per_worker: float = 0.0):
    """The executor ``name`` (``--executor``) with its options."""
    if name == "local":
        return Local()
    if name == "ray":
        ray_module()  # fail before anything loads when Ray is missing
        return RayExecutor(workers=workers, address=address, gpus_per_worker=gpus_per_worker)
    raise FactscopeError(f"unknown --executor {name!r}; use {' or '.join(EXECUTORS)}")
