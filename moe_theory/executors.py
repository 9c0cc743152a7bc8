"""Executors: where the cells of a sweep are computed.

A sweep (:mod:`moe_theory.sweep`) is a grid of independent cells. The process that owns the run
folder, the *driver*, submits one task per cell to an executor and stores each result as it
arrives (:func:`moe_theory.storage.write_part`). The folder therefore has a single writer whatever
computes the cells, and ``--resume`` works the same for every executor. Every executor offers

* ``submit(fn, *args, key=None)`` → a future (``key`` names the task where the executor has names),
* ``as_completed(futures)`` → the futures, each once, as their results become available
  (``future.result()`` returns the value or raises the task's exception),
* ``release(future)``, ``cancel(futures)``, ``close()`` and ``describe()`` (a dict for ``meta.json``),
* ``in_process``: whether tasks run in the driver itself, sharing its compiled programs.

:class:`LocalExecutor`, the default, runs each task in the driver, on the calling thread, in
submission order, and only when ``as_completed`` reaches it. A cell is thus stored before the next
one starts (what an interrupted run keeps), and the sweep's compile-ahead thread overlaps
compilation with the cells exactly as it did before this seam existed.

:class:`DaskExecutor` hands tasks to a Dask distributed cluster (the optional extra
``moe_theory[distributed]``): a local cluster it starts (``workers=N``: N worker processes, one
thread each, so that each process owns its accelerator and its compiled programs), or an existing
scheduler (``scheduler=ADDRESS``, or the path of a scheduler file, as dask-jobqueue and
``dask scheduler --scheduler-file`` write). When a worker dies, Dask runs its unfinished tasks again
on another, and each future still completes once: a lost worker loses no cell and duplicates none. ``docs/distributed.md`` describes clusters and GPUs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

EXECUTORS = ("local", "dask")

DASK_MISSING = (
    "--executor dask needs Dask distributed, the optional extra 'distributed': "
    "pip install -e \".[distributed]\" (or pip install \"dask[distributed]>=2024.1\")"
)


class ExecutorError(RuntimeError):
    """An executor cannot be set up: a missing package, unreachable scheduler or conflicting options."""


class _DeferredCall:
    """The future of :class:`LocalExecutor`: the call runs, once, when its result is first asked for."""

    def __init__(self, fn: Callable[..., Any], args: tuple):
        self._call: tuple[Callable[..., Any], tuple] | None = (fn, args)
        self._value: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._call is None

    def result(self) -> Any:
        if self._call is not None:
            fn, args = self._call
            self._call = None
            try:
                self._value = fn(*args)
            except Exception as error:  # noqa: BLE001 - kept and raised to whoever asks for the result
                self._error = error
        if self._error is not None:
            raise self._error
        return self._value


class LocalExecutor:
    """Tasks run in this process, one after the other, in the order they were submitted."""

    in_process = True

    def submit(self, fn: Callable[..., Any], *args: Any, key: str | None = None) -> _DeferredCall:
        return _DeferredCall(fn, args)

    def as_completed(self, futures: Iterable[_DeferredCall]) -> Iterator[_DeferredCall]:
        for future in futures:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - the caller's future.result() raises it
                pass
            yield future

    def release(self, future: _DeferredCall) -> None:
        future._value = None

    def cancel(self, futures: Iterable[_DeferredCall]) -> None:
        pass  # nothing runs ahead of as_completed

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "local"}


class DaskExecutor:
    """Tasks run on the workers of a Dask distributed cluster.

    Give exactly one of ``client`` (an existing ``distributed.Client``, which stays open),
    ``workers`` (start a local cluster of that many single-threaded worker processes) or
    ``scheduler`` (connect to a running scheduler: an address such as ``tcp://node:8786``, or the
    path of a scheduler file). A cluster or client the executor made is closed by :meth:`close`.
    """

    in_process = False

    def __init__(self, client: Any = None, *, workers: int | None = None, scheduler: str | None = None,
                 connect_timeout: float = 30.0):
        if sum(option is not None for option in (client, workers, scheduler)) != 1:
            raise ExecutorError("the dask executor needs exactly one of a client, --workers N or --scheduler ADDRESS")
        try:
            import distributed
        except ImportError as error:
            raise ExecutorError(DASK_MISSING) from error
        self._distributed = distributed
        self._cluster = None
        self._own_client = client is None
        try:
            if workers is not None:
                if workers < 1:
                    raise ExecutorError(f"--workers must be at least 1, got {workers}")
                # One thread per worker: a JAX process uses its device (and the CPU's cores) fully on
                # its own, and a worker's programs are compiled once for its cells.
                self._cluster = distributed.LocalCluster(n_workers=workers, processes=True, threads_per_worker=1,
                                                         dashboard_address=None)
                client = distributed.Client(self._cluster)
            elif scheduler is not None:
                if Path(scheduler).is_file():
                    client = distributed.Client(scheduler_file=scheduler, timeout=connect_timeout)
                else:
                    client = distributed.Client(scheduler, timeout=connect_timeout)
        except (OSError, TimeoutError) as error:
            self.close()
            what = f"reach the Dask scheduler {scheduler}" if scheduler is not None else "start a local Dask cluster"
            raise ExecutorError(f"cannot {what}: {error}") from error
        self.client = client

    def submit(self, fn: Callable[..., Any], *args: Any, key: str | None = None) -> Any:
        # pure=False: the same arguments submitted again (a rerun) are a new task, not a cached result.
        return self.client.submit(fn, *args, key=key, pure=False)

    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]:
        return iter(self._distributed.as_completed(list(futures)))

    def release(self, future: Any) -> None:
        # The driver has stored the result: the cluster may forget it (and need not recompute it
        # if the worker holding it dies later).
        future.release()

    def cancel(self, futures: Iterable[Any]) -> None:
        pending = [future for future in futures if not future.done()]
        if pending:
            self.client.cancel(pending)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None and self._own_client:
            client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def describe(self) -> dict[str, Any]:
        workers = self.client.scheduler_info().get("workers", {})
        return {"kind": "dask", "scheduler": self.client.scheduler.address, "workers": len(workers),
                "local_cluster": self._cluster is not None}


@dataclass(frozen=True)
class ExecutorOptions:
    """An executor to open for one sweep and close after it, as the command line describes it
    (``--executor``, ``--workers``, ``--scheduler``). Giving ``workers`` or ``scheduler`` implies
    the dask executor."""

    kind: str | None = None
    workers: int | None = None
    scheduler: str | None = None

    def resolved_kind(self) -> str:
        if self.kind is None:
            return "dask" if self.workers is not None or self.scheduler is not None else "local"
        if self.kind not in EXECUTORS:
            raise ExecutorError(f"unknown executor {self.kind!r}; choose one of {', '.join(EXECUTORS)}")
        return self.kind

    def check(self) -> None:
        """Raise :class:`ExecutorError` for options that cannot work, before any work starts."""
        kind = self.resolved_kind()
        if kind == "local" and (self.workers is not None or self.scheduler is not None):
            raise ExecutorError("--workers and --scheduler apply to --executor dask only")
        if kind == "dask":
            if self.workers is not None and self.scheduler is not None:
                raise ExecutorError("give --workers N (a local Dask cluster) or --scheduler ADDRESS, not both")
            if self.workers is not None and self.workers < 1:
                raise ExecutorError(f"--workers must be at least 1, got {self.workers}")
            if self.workers is None and self.scheduler is None:
                raise ExecutorError("--executor dask needs --workers N (a local cluster of N processes) "
                                    "or --scheduler ADDRESS (a running Dask scheduler)")
            if importlib.util.find_spec("distributed") is None:
                raise ExecutorError(DASK_MISSING)

    def open(self) -> LocalExecutor | DaskExecutor:
        self.check()
        if self.resolved_kind() == "local":
            return LocalExecutor()
        return DaskExecutor(workers=self.workers, scheduler=self.scheduler)
