"""Shared helpers of the benchmark scripts: interleaved timing, peak memory, stage timers, and the
Markdown tables appended to ``bench/RESULTS.md`` with the machine and the exact command.

Every comparison in the suite is a ratio of runs made in the same process, interleaved (A, B, A,
B, ...) so that load from other processes hits both alike, summarised by medians.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import resource
import shlex
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads in torch (OpenMP); FAISS follows when it is imported."""
    torch.set_num_threads(threads)
    with contextlib.suppress(ImportError):
        import faiss

        faiss.omp_set_num_threads(threads)


def rss_bytes() -> int:
    """The process's current resident set size."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * _PAGE


class PeakMemory:
    """Peak resident memory above the starting level while the block runs (sampled every 2 ms).

    RSS sampling sees every allocator (torch, numpy, FAISS), unlike ``tracemalloc``; the process's
    all-time peak (``ru_maxrss``) is kept too.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        """Bytes above the level at entry."""
        return self.peak - self.start


def max_rss_bytes() -> int:
    """The process's all-time peak resident memory (``getrusage``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def interleaved(
    runs: Mapping[str, Callable[[], object]], repeats: int, *, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall-clock seconds of each run, ``repeats`` times, the runs alternating every round.

    ``warmup`` untimed rounds come first (lazy initialisation, caches, allocator growth).
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class StageTimer:
    """Seconds spent in named stages, accumulated by wrapping functions or methods.

    :meth:`patch` replaces an attribute of an object or module by a timing wrapper for the
    duration of the ``with`` block (the library itself carries no timing code). Nested stages
    count in both; :meth:`forward_time` measures the time inside ``torch.nn.Module`` forwards.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1

        return timed

    @contextlib.contextmanager
    def patch(self, targets: Sequence[tuple[str, object, str]]) -> Iterator[StageTimer]:
        """Time ``(stage, owner, attribute)`` callables while the block runs, then restore them."""
        saved = [(owner, attr, owner.__dict__.get(attr, _MISSING)) for _, owner, attr in targets]
        try:
            for stage, owner, attr in targets:
                setattr(owner, attr, self.wrap(stage, getattr(owner, attr)))
            yield self
        finally:
            for owner, attr, original in reversed(saved):
                if original is _MISSING:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, original)

    @contextlib.contextmanager
    def forward_time(self, models: Sequence[torch.nn.Module], stage: str = "model forward"):
        """Accumulate into ``stage`` the time during which any module of ``models`` is in its
        forward (outermost calls only, so nested modules are not counted twice)."""
        depth = [0]
        started = [0.0]

        def pre(*_: object) -> None:
            if depth[0] == 0:
                started[0] = time.perf_counter()
            depth[0] += 1

        def post(*_: object) -> None:
            depth[0] -= 1
            if depth[0] == 0:
                self.seconds[stage] += time.perf_counter() - started[0]
                self.calls[stage] += 1

        handles = []
        for model in models:
            for module in model.modules():
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


_MISSING = object()


def machine_info() -> dict[str, str]:
    """CPU model, cores, torch threads, ``OMP_NUM_THREADS`` and library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    with contextlib.suppress(ImportError):
        import faiss

        info["faiss"] = faiss.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats get 3 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The exact command that ran this process, with the thread settings it ran under."""
    env = (
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} "
        if "OMP_NUM_THREADS" in (os.environ)
        else ""
    )
    module = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", module.name] if module is not None else ["python", sys.argv[0]]
    return env + shlex.join([*head, *sys.argv[1:]])


def report(
    title: str, sections: Sequence[str], *, results: Path | None = RESULTS, notes: str = ""
) -> str:
    """Print a Markdown section (title, date, command, machine, tables) and append it to
    ``results`` (``None``: print only). Returns the section."""
    info = ", ".join(f"{k}: {v}" for k, v in machine_info().items())
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [f"## {title}", f"*{date}* — `{command_line()}`", f"Machine: {info}."]
    if notes:
        parts.append(notes)
    text = "\n\n".join([*parts, *sections]) + "\n"
    print(text)
    if results is not None:
        with open(results, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    return text


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every script takes: ``--repeats``, ``--threads``, ``--size``, ``--no-save``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch/FAISS threads")
    parser.add_argument(
        "--size",
        choices=("tiny", "real"),
        default="real",
        help="real-size architectures (random weights) or tiny ones (smoke tests)",
    )
    parser.add_argument("--models-dir", type=Path, default=None, help="cache of saved models")
    parser.add_argument("--no-save", action="store_true", help="do not append to RESULTS.md")
    return parser


def results_path(args: argparse.Namespace) -> Path | None:
    return None if args.no_save else RESULTS


def gib(n: float) -> float:
    return n / 2**30


def mib(n: float) -> float:
    return n / 2**20
