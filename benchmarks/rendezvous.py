"""Benchmark: N rendezvous nodes, min = max = N, on every backend; and death detection.

Backends, all created through torch's handler API (``RendezvousHandler``):

- ``etcd-v3``: our native engine through its torch handler (the ``etcd-v3`` entry
  point); the engine's ``Rendezvous`` directly if that handler does not import
  (the tables then say ``engine``);
- ``etcd-v3-dynamic``: torch's ``DynamicRendezvousHandler`` on our etcd v3 backend;
- torch's ``c10d`` (TCPStore hosted by the first handler) and ``etcd-v2`` (python-etcd).

Part 1 (scale). For each N and backend, N handlers in threads of one child process
(``benchmarks/_rdzv_harness.py``) are created, then all call ``next_rendezvous()`` at
once; we measure the time until every call returned, count the etcd requests per node
(a counting ``EtcdClient`` for ours, ``etcd.Client.api_execute`` calls for ``etcd-v2``,
watch streams apart), torch's backend ``get_state``/``set_state`` calls, and failures
(an exception, or no rank within the bound). The native rows for N >= 256 split the N
threads over N/128 processes (``--native-procs-above``): with 1,024 threads in one
process the GIL starves the lease keep-alives. A torch baseline that timed out at some
N is not run at larger N. Medians over ``--repeats`` runs for N <= 64, one run above.

Part 2 (failure detection). 3 nodes (min 2, max 3, default settings) in separate
processes; one is SIGKILLed; we measure until both survivors see it, polling as
torchrun's agent does (every 0.1 s): ``num_nodes_waiting() > 0`` for the native
handler, a participant dropped from torch's state for the dynamic handlers (torch does
not count dead nodes as waiting).

One etcd (our ``EtcdServer`` with ``--enable-v2`` for ``etcd-v2``) serves every etcd
backend. Prints markdown tables, writes benchmarks/results/rendezvous.json and
docs/rendezvous.png.

    python benchmarks/rendezvous.py [--binary ETCD] [--sizes 2,8,...,1024] [--timeout 120]
        [--repeats 3] [--backends ...] [--detect-runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from etcd_rendezvous.server import EtcdServer

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "_rdzv_harness.py"
RESULTS = HERE / "results" / "rendezvous.json"
PLOT = HERE.parent / "docs" / "rendezvous.png"

NATIVE = "etcd-v3"
DYNAMIC = "etcd-v3-dynamic"
BACKENDS = (NATIVE, DYNAMIC, "c10d", "etcd-v2")
DETECT_BACKENDS = (NATIVE, DYNAMIC, "c10d")
SIZES = "2,8,32,64,128,256,512,1024"

Line = dict[str, Any]


@dataclass
class Case:
    backend: str
    n: int
    procs: int = 1
    mode: str = "handler"
    seconds: float | None = None  # None: not every node had its rank within the bound
    failures: int = 0
    etcd: int = 0
    watches: int = 0
    state_ops: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Detection:
    backend: str
    seconds: float | None  # None: not seen within the bound
    how: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Child:
    """A harness process in its own process group, its stdout lines in a queue."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HARNESS), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.SimpleQueue[Line | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:  # pragma: no cover - always a pipe
            return
        for raw in stdout:
            try:
                self.lines.put(json.loads(raw))
            except json.JSONDecodeError:
                continue
        self.lines.put(None)

    def expect(self, event: str, deadline: float) -> Line:
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise TimeoutError(f"child exited (rc {self.proc.wait()}) before {event!r}")
            if line.get("event") == event:
                return line
        raise TimeoutError(f"no {event!r} in time")

    def send(self, text: str) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.write(text)
            self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def run_case(backend: str, n: int, etcd: str, bound: float, procs: int) -> Case:
    case = Case(backend, n, procs=procs)
    endpoint = f"127.0.0.1:{_free_port()}" if backend == "c10d" else etcd
    run_id = f"bench-{backend}-{n}-{uuid.uuid4().hex[:6]}"
    counts = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    children = [
        Child(["case", backend, str(n), endpoint, str(bound), run_id, str(c)]) for c in counts
    ]
    try:
        ready_by = time.monotonic() + 120.0
        for child in children:
            child.expect("ready", ready_by)
        for child in children:
            child.send("go\n")
        done_by = time.monotonic() + bound + 30.0
        results = [child.expect("result", done_by) for child in children]
    except TimeoutError as exc:
        case.failures = n
        case.errors.append(f"harness: {exc}")
        return case
    finally:
        for child in children:
            child.kill()
    start = min(r["start"] for r in results)
    case.mode = results[0]["mode"]
    case.failures = sum(r["failures"] for r in results)
    for key in ("etcd", "watches", "state_ops"):
        setattr(case, key, sum(int(r[key]) for r in results))
    case.errors = [e for r in results for e in r["errors"]][:3]
    if not case.failures:
        case.seconds = max(r["last_done"] for r in results) - start
    return case


def detect_once(backend: str, etcd: str, bound: float) -> Detection:
    endpoint = f"127.0.0.1:{_free_port()}" if backend == "c10d" else etcd
    run_id = f"detect-{backend}-{uuid.uuid4().hex[:6]}"
    children: list[Child] = []
    try:
        # The first node first: with c10d it hosts the TCPStore (and is not the one killed).
        children.append(Child(["node", backend, endpoint, run_id]))
        children[0].expect("created", time.monotonic() + 60.0)
        children += [Child(["node", backend, endpoint, run_id]) for _ in range(2)]
        by = time.monotonic() + 90.0
        for child in children:
            child.expect("assigned", by)
        time.sleep(1.0)  # steady state: heartbeats / keep-alives running
        killed = time.time()
        os.killpg(children[2].proc.pid, signal.SIGKILL)
        by = time.monotonic() + bound
        seen = [child.expect("seen", by) for child in children[:2]]
        return Detection(backend, max(s["t"] for s in seen) - killed, seen[0]["how"])
    except TimeoutError as exc:
        return Detection(backend, None, f"not seen: {exc}")
    finally:
        for child in children:
            child.kill()


# --- reporting ---------------------------------------------------------------------------


def _median(cases: list[Case]) -> float | None:
    times = [c.seconds for c in cases if c.seconds is not None]
    return statistics.median(times) if times and len(times) == len(cases) else None


def _per_node(cases: list[Case], key: str) -> str:
    values = [getattr(c, key) / c.n for c in cases if c.seconds is not None]
    return f"{statistics.median(values):.1f}" if values else "-"


def scale_tables(
    sizes: list[int],
    backends: list[str],
    results: dict[str, dict[int, list[Case]]],
    skipped: dict[str, dict[int, int]],
    bound: float,
    repeats: int = 3,
) -> str:
    native_mode = next((c.mode for cs in results.get(NATIVE, {}).values() for c in cs), "handler")
    native_label = NATIVE if native_mode == "handler" else f"{NATIVE} (engine, no handler)"
    labels = [native_label if b == NATIVE else b for b in backends]
    ratio_to = [b for b in ("c10d", "etcd-v2") if b in backends and NATIVE in backends]
    out = [
        f"Time until every node has its rank (median of {repeats} runs for N <= 64, 1 run "
        f"above; bound {bound:.0f} s)\n",
        "| N | " + " | ".join(labels) + "".join(f" | {NATIVE} / {b}" for b in ratio_to) + " |",
        "|---:" * (1 + len(labels) + len(ratio_to)) + "|",
    ]
    for n in sizes:
        row = [str(n)]
        for b in backends:
            cases = results.get(b, {}).get(n, [])
            if n in skipped.get(b, {}):
                row.append(f"not run (timed out at N={skipped[b][n]})")
            elif not cases:
                row.append("-")
            elif (med := _median(cases)) is not None:
                procs = f" [{cases[0].procs} procs]" if cases[0].procs > 1 else ""
                row.append(f"{med:.2f} s{procs}")
            else:
                failed = max(c.failures for c in cases)
                row.append(f"timeout ({failed}/{n} failed)")
        native = _median(results.get(NATIVE, {}).get(n, []))
        for b in ratio_to:
            theirs = _median(results.get(b, {}).get(n, []))
            if native is not None and theirs is not None:
                row.append(f"{native / theirs:.3f}")
            elif native is not None and results.get(b, {}).get(n):
                row.append(f"< {native / bound:.3f}")
            else:
                row.append("-")
        out.append("| " + " | ".join(row) + " |")
    out += [
        "",
        "Requests per node until every node had its rank (median): etcd unary requests "
        "(+ watch streams opened); torch backend get_state/set_state calls",
        "",
        "| N | "
        + " | ".join(f"{b} etcd" for b in backends if b != "c10d")
        + " | "
        + " | ".join(f"{b} state ops" for b in backends if b != NATIVE)
        + " |",
        "|---:" * (1 + len(backends) - ("c10d" in backends) + len(backends) - 1) + "|",
    ]
    for n in sizes:
        row = [str(n)]
        for b in backends:
            if b == "c10d":
                continue
            cases = results.get(b, {}).get(n, [])
            cell = _per_node(cases, "etcd")
            if b in (NATIVE, DYNAMIC) and cell != "-":
                cell += f" (+{_per_node(cases, 'watches')})"
            row.append(cell)
        for b in backends:
            if b != NATIVE:
                row.append(_per_node(results.get(b, {}).get(n, []), "state_ops"))
        out.append("| " + " | ".join(row) + " |")
    failures = [
        f"{b} N={n}: {c.failures} failed ({c.errors[0] if c.errors else 'no rank in time'})"
        for b in backends
        for n, cases in results.get(b, {}).items()
        for c in cases
        if c.failures
    ]
    out += ["", "Failures: " + ("; ".join(failures) if failures else "none")]
    return "\n".join(out)


def detect_table(detections: dict[str, list[Detection]]) -> str:
    out = [
        "Time from a participant's SIGKILL until both survivors see it (3 nodes, min 2 "
        "max 3, default settings; polled every 0.1 s)\n",
        "| backend | median | runs | seen as |",
        "|---|---:|---|---|",
    ]
    for b, runs in detections.items():
        times = [d.seconds for d in runs if d.seconds is not None]
        med = f"{statistics.median(times):.2f} s" if times else "not seen"
        each = ", ".join(f"{d.seconds:.2f}" if d.seconds is not None else "-" for d in runs)
        hows = sorted({d.how for d in runs}, key=lambda h: h.startswith("not seen"))
        out.append(f"| {b} | {med} | {each} | {'; '.join(hows) or '-'} |")
    return "\n".join(out)


def plot(
    sizes: list[int],
    backends: list[str],
    results: dict[str, dict[int, list[Case]]],
    bound: float,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for b in backends:
        ok = [(n, m) for n in sizes if (m := _median(results.get(b, {}).get(n, []))) is not None]
        lines = ax.plot([n for n, _ in ok], [m for _, m in ok], marker="o", label=b)
        timed_out = [
            n for n in sizes if results.get(b, {}).get(n) and _median(results[b][n]) is None
        ]
        if timed_out:
            ax.scatter(
                timed_out,
                [bound] * len(timed_out),
                marker="x",
                s=80,
                color=lines[0].get_color(),
                label=f"{b}: timeout ({bound:.0f} s)",
            )
    ax.axhline(bound, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nodes N (min = max = N)")
    ax.set_ylabel("seconds until every node has its rank")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--binary", default=None, help="etcd binary (default: discovery)")
    parser.add_argument("--sizes", default=SIZES)
    parser.add_argument("--timeout", type=float, default=120.0, help="bound of each case (s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case, N <= 64")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--native-procs-above",
        type=int,
        default=128,
        help="native rows with N above this use N/this processes",
    )
    parser.add_argument("--detect-runs", type=int, default=3, help="0 skips part 2")
    parser.add_argument("--detect-backends", default=",".join(DETECT_BACKENDS))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results: dict[str, dict[int, list[Case]]] = {b: {} for b in backends}
    skipped: dict[str, dict[int, int]] = {b: {} for b in backends}
    timed_out_at: dict[str, int] = {}
    detections: dict[str, list[Detection]] = {}

    with EtcdServer(binary=args.binary, extra_args=["--enable-v2"]) as server:
        version = server.version
        header = (
            f"etcd {server.version} ({server.binary}) at {server.endpoint}; "
            f"{os.cpu_count()} CPUs; Python {platform.python_version()}"
        )
        print(header + "\n", flush=True)
        for n in sizes:
            repeats = args.repeats if n <= 64 else 1
            for b in backends:
                if b in timed_out_at:
                    skipped[b][n] = timed_out_at[b]
                    print(f"  {b:16s} N={n:4d}: not run (timed out at N={timed_out_at[b]})")
                    continue
                procs = 1
                if b == NATIVE and n > args.native_procs_above:
                    procs = n // args.native_procs_above
                for _ in range(repeats):
                    case = run_case(b, n, server.endpoint, args.timeout, procs)
                    results[b].setdefault(n, []).append(case)
                    shown = f"{case.seconds:.2f} s" if case.seconds is not None else "TIMEOUT"
                    print(
                        f"  {b:16s} N={n:4d}: {shown}, {case.failures} failed, "
                        f"{case.etcd / n:.1f} etcd req/node, {case.state_ops / n:.1f} state "
                        f"ops/node" + (f" ({case.errors[0]})" if case.errors else ""),
                        flush=True,
                    )
                    if case.seconds is None and b != NATIVE:
                        timed_out_at[b] = n
                        break
        if args.detect_runs:
            print("\nfailure detection", flush=True)
            for b in [x.strip() for x in args.detect_backends.split(",") if x.strip()]:
                for _ in range(args.detect_runs):
                    d = detect_once(b, server.endpoint, 60.0)
                    detections.setdefault(b, []).append(d)
                    shown = f"{d.seconds:.2f} s" if d.seconds is not None else "not seen"
                    print(f"  {b:16s}: {shown} ({d.how})", flush=True)

    print()
    tables = scale_tables(sizes, backends, results, skipped, args.timeout, args.repeats)
    print(tables)
    if detections:
        print()
        print(detect_table(detections))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "header": header,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "bound_s": args.timeout,
                "native_procs_above": args.native_procs_above,
                "cases": [asdict(c) for b in backends for cs in results[b].values() for c in cs],
                "skipped": skipped,
                "detections": [asdict(d) for ds in detections.values() for d in ds],
            },
            indent=1,
        )
        + "\n"
    )
    plot(
        sizes,
        backends,
        results,
        args.timeout,
        f"etcd {version}, {os.cpu_count()} CPUs: N handlers, min = max = N",
    )
    print(f"\nwrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    main()
