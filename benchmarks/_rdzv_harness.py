"""The child processes of ``benchmarks/rendezvous.py`` (one JSON object per stdout line).

``python benchmarks/_rdzv_harness.py case BACKEND N ENDPOINT BOUND RUN_ID COUNT``
    COUNT of the N nodes of RUN_ID (min = max = N): COUNT torch rendezvous handlers in
    threads of this process (the parent may start several such processes), all created
    first; prints ``ready``, waits for a line on stdin (the parent's go), then all call
    ``next_rendezvous()`` at once. Prints one ``result`` line: the wall time of the go and
    of the last return, how many returned within BOUND, the failures, the
    etcd requests (a counting ``EtcdClient`` for ours, ``etcd.Client.api_execute`` calls
    for torch's ``etcd-v2``) and torch backend ``get_state``/``set_state`` calls, counted
    until the last node had its rank.

``python benchmarks/_rdzv_harness.py node BACKEND ENDPOINT RUN_ID``
    One handler (min 2, max 3, default settings) in its own process: prints ``created``,
    ``assigned`` once ``next_rendezvous()`` returned, then polls every 0.1 s (torchrun's
    ``monitor_interval``) and prints ``seen`` once it notices a member is gone:
    ``num_nodes_waiting() > 0`` or, for torch's dynamic handler (which only drops a dead
    node from its participants and does not count it as waiting), fewer participants.

BACKEND: ``etcd-v3`` (the native engine through its torch handler, or the engine's
``Rendezvous`` directly, ``engine``, when the handler does not import), ``etcd-v3-dynamic``
(torch's DynamicRendezvousHandler on our v3 backend), ``c10d``, ``etcd-v2``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousParameters,
    rendezvous_handler_registry,
)

from etcd_rendezvous.client import EtcdClient, Watch

NATIVE = "etcd-v3"
DYNAMIC = "etcd-v3-dynamic"


def emit(**fields: Any) -> None:
    print(json.dumps({"t": time.time(), **fields}), flush=True)


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.etcd = 0
        self.watches = 0
        self.state_ops = 0

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"etcd": self.etcd, "watches": self.watches, "state_ops": self.state_ops}


COUNT = _Counter()


class CountingClient(EtcdClient):
    """Our EtcdClient, counting unary requests and watch streams opened (process-wide)."""

    def _call(self, path: str, body: Any, **kwargs: Any) -> dict[str, Any]:
        COUNT.add("etcd")
        return super()._call(path, body, **kwargs)

    def watch(self, key: bytes | str, **kwargs: Any) -> Watch:
        COUNT.add("watches")
        return super().watch(key, **kwargs)


def _count_calls(cls: Any, name: str, counter: str) -> None:
    original: Callable[..., Any] = getattr(cls, name)

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        COUNT.add(counter)
        return original(self, *args, **kwargs)

    setattr(cls, name, counted)


def instrument() -> str:
    """Register our two handlers under the benchmark's names and install the counters.

    Returns how the native row is run: ``handler`` or ``engine``.
    """
    from etcd_rendezvous.torchrun import plugin

    # both our handlers connect through plugin.create_client, which looks EtcdClient up here
    setattr(plugin, "EtcdClient", CountingClient)  # noqa: B010
    for backend_cls in _torch_backend_classes():
        _count_calls(backend_cls, "get_state", "state_ops")
        _count_calls(backend_cls, "set_state", "state_ops")
    try:
        import etcd

        _count_calls(etcd.Client, "api_execute", "etcd")
    except ImportError:
        pass
    try:
        from etcd_rendezvous.torchrun import native
    except Exception as exc:  # the adapter is being written beside this benchmark
        logging.getLogger(__name__).warning("native handler unavailable: %s", exc)
        return "engine"
    _register(NATIVE, native.create_native_handler)
    return "handler"


def _torch_backend_classes() -> list[Any]:
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )

    from etcd_rendezvous.torchrun.backend import EtcdRendezvousBackend

    classes: list[Any] = [C10dRendezvousBackend, EtcdRendezvousBackend]
    try:
        from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import (
            EtcdRendezvousBackend as TorchEtcdBackend,
        )

        classes.append(TorchEtcdBackend)
    except ImportError:
        pass
    return classes


def _register(name: str, creator: Callable[[RendezvousParameters], RendezvousHandler]) -> None:
    with contextlib.suppress(ValueError):  # already registered by the entry point
        rendezvous_handler_registry.register(name, creator)


class _EngineNode:
    """The engine's Rendezvous with the one method of a handler the benchmark uses."""

    def __init__(self, endpoint: str, run_id: str, lo: int, hi: int) -> None:
        from etcd_rendezvous.rendezvous import Rendezvous

        self.client = CountingClient(endpoint)
        self.rdzv = Rendezvous(self.client, run_id, lo, hi)

    def num_nodes_waiting(self) -> int:
        return self.rdzv.num_nodes_waiting()

    def next_rendezvous(self) -> object:
        return self.rdzv.join()


def _params(backend: str, endpoint: str, run_id: str, lo: int, hi: int, **conf: Any) -> Any:
    return RendezvousParameters(backend, endpoint, run_id, lo, hi, **conf)


def _create(backend: str, mode: str, endpoint: str, run_id: str, lo: int, hi: int) -> Any:
    """One handler (or engine node) for ``backend``; ``lo``/``hi``: min and max nodes."""
    if backend == NATIVE and mode == "engine":
        return _EngineNode(endpoint, run_id, lo, hi)
    if backend == DYNAMIC:
        from etcd_rendezvous.torchrun import plugin

        # torch's DynamicRendezvousHandler on our v3 backend, whatever name the
        # torchrun.handlers entry point gives it (etcd-v3 now, etcd-v3-dynamic later).
        return plugin.create_rdzv_handler(_params("etcd-v3", endpoint, run_id, lo, hi))
    return rendezvous_handler_registry.create_handler(_params(backend, endpoint, run_id, lo, hi))


def run_case(backend: str, n: int, endpoint: str, bound: float, run_id: str, count: int) -> None:
    """``count`` of the ``n`` nodes of ``run_id`` in threads; the others run elsewhere."""
    mode = instrument()
    handlers: list[Any] = [None] * count
    done: list[float | None] = [None] * count
    errors: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(count + 1)
    go = threading.Event()
    last: dict[str, Any] = {}

    def node(i: int) -> None:
        try:
            handlers[i] = _create(backend, mode, endpoint, run_id, n, n)
        except Exception as exc:
            with lock:
                errors.append(f"create: {type(exc).__name__}: {exc}"[:300])
            gate.wait()
            return
        gate.wait()
        go.wait()
        try:
            handlers[i].next_rendezvous()
            now = time.time()
            with lock:
                done[i] = now
                if all(d is not None for d in done):
                    last["counts"] = COUNT.snapshot()
        except Exception as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    gate.wait()  # every handler created (torchrun agents exist before they join)
    created = COUNT.snapshot()
    emit(event="ready")
    line = sys.stdin.readline()  # the parent's go, once every process is ready
    start = time.time()
    go.set()
    deadline = time.monotonic() + bound
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    finished = [d for d in done if d is not None]
    end = last.get("counts") or COUNT.snapshot()
    emit(
        event="result",
        backend=backend,
        mode=mode if backend == NATIVE else "handler",
        go_line=line.strip(),
        start=start,
        last_done=max(finished) if finished else None,
        finished=len(finished),
        failures=count - len(finished),
        errors=errors[:3],
        n_errors=len(errors),
        **{k: end[k] - created[k] for k in end},
    )
    # No clean-up on purpose: leaving (or closing) costs N more writes and a stuck torch
    # handler does not stop; the process goes and the run ids are never reused.
    os._exit(0)


def run_node(backend: str, endpoint: str, run_id: str) -> None:
    """One node of a min 2 / max 3 rendezvous, watching for a member's death."""
    mode = instrument()
    handler = _create(backend, mode, endpoint, run_id, 2, 3)
    emit(event="created")
    lost = threading.Event()
    if isinstance(handler, _EngineNode):
        handler.rdzv.add_listener(lambda c: lost.set() if c.lost else None)
    world = getattr(handler.next_rendezvous(), "world_size", 3)
    emit(event="assigned", world=world)
    state_holder = getattr(handler, "_state_holder", None)  # torch's dynamic handler
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline:
        waiting = handler.num_nodes_waiting()
        if waiting > 0 or lost.is_set():
            emit(event="seen", how=f"num_nodes_waiting()={waiting}")
            break
        if state_holder is not None and len(state_holder.state.participants) < world:
            emit(event="seen", how="participant dropped")
            break
        time.sleep(0.1)
    os._exit(0)


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    mode, *args = sys.argv[1:]
    if mode == "case":
        backend, n, endpoint, bound, run_id, count = args
        run_case(backend, int(n), endpoint, float(bound), run_id, int(count))
    elif mode == "node":
        run_node(*args)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
