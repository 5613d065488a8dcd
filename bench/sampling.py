"""Per-process CPU and memory of a server's process tree, grouped by role.

    cpu = cpu_counter(server.pid)          # CPU seconds so far, per role
    before = cpu(); ...; per_image = cpu_per_image(before, cpu(), images)

    with TreeSampler(server.pid, interval_s=0.2) as sampler:   # a background thread
        ...                                                    # the load
    sampler.peak_rss_bytes, sampler.peak_rss_by_role

Roles (`bentoml_role`): BentoML's model worker ("model"), its HTTP front workers
("front"), the server's own process or an MLflow/uvicorn one ("server"), anything else
("other"). RSS is summed over processes, so pages they share count once per process: an
upper bound, the figure `ps` and the kernel's OOM killer go by.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def bentoml_role(proc, server_pid: int) -> str:
    """The role of one process of a `bentoml serve` (or `mlflow models serve`) tree."""
    line = " ".join(proc.cmdline())
    if "_bentoml_impl.worker" not in line:
        return "server" if proc.pid == server_pid or "mlflow" in line or "uvicorn" in line else "other"
    return "model" if "imgcls-model" in line else "front"


def service_role(server: str) -> Classify:
    """The roles of `server`'s tree: `imgcls-1p`'s one worker holds the model (and decodes,
    as LitServe's inference worker does), so it counts as "model"."""
    if server != "imgcls-1p":
        return bentoml_role

    def one_process(proc, server_pid: int) -> str:
        role = bentoml_role(proc, server_pid)
        return "model" if role == "front" else role

    return one_process


def peer_role(proc, server_pid: int) -> str:
    """The role of one process of a peer server (bench.peers): the process holding the
    model (named by bench.peers.work, or Ray's replica) is "model"; LitServe's API servers
    (forked or spawned children of the launcher) and Ray's HTTP proxy "front"; the launcher
    and Ray's own daemons (GCS, raylet, controller, idle workers) "server"."""
    from bench.peers import MODEL_PROCESS_NAME

    if proc.pid == server_pid:
        return "server"
    line = " ".join(proc.cmdline())
    if proc.name() == MODEL_PROCESS_NAME or "ServeReplica" in line:
        return "model"
    front = ("ProxyActor", "litserve_app", "multiprocessing")
    return "front" if any(mark in line for mark in front) else "server"


def process_tree(pid: int) -> list:
    """The psutil.Process of `pid` and of all its descendants alive now."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system) and resident memory of a role's processes."""

    cpu_s: float = 0.0
    rss_bytes: int = 0
    processes: int = 0


Classify = Callable[[object, int], str]


def sample_tree(pid: int, classify: Classify = bentoml_role) -> dict[str, Usage]:
    """CPU seconds so far and RSS now of the tree under `pid`, summed per role."""
    import psutil

    out: dict[str, Usage] = {}
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.Error):  # a process may exit mid-read
            times, rss, role = proc.cpu_times(), proc.memory_info().rss, classify(proc, pid)
            seen = out.get(role, Usage())
            out[role] = Usage(
                seen.cpu_s + times.user + times.system, seen.rss_bytes + rss, seen.processes + 1
            )
    return out


def cpu_counter(server_pid: int, classify: Classify = bentoml_role) -> Callable[[], dict[str, float]]:
    """A function giving CPU seconds so far of this process ("client") and of the server's
    processes per role. bench.loadgen.run_level adds its Locust child's CPU of the
    level to "client": the load generator is this process and that child together."""
    import resource

    def counts() -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        tree = sample_tree(server_pid, classify)
        return {"client": usage.ru_utime + usage.ru_stime} | {role: u.cpu_s for role, u in tree.items()}

    return counts


def cpu_per_image(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    """CPU ms per answered image of each role between two `cpu_counter` reads."""
    if not images:
        return {}
    return {key: 1000 * (after[key] - before.get(key, 0.0)) / images for key in after}


@dataclass
class TreeSampler:
    """A background thread sampling the process tree under `pid` every `interval_s`.

    Keeps `samples` as (perf_counter seconds, {role: Usage}) and the peaks of the summed
    RSS (`peak_rss_bytes`, at `peak_at`) and per role (`peak_rss_by_role`). Processes
    that come and go between samples (a new model loading) are seen if they live
    longer than `interval_s`. Use as a context manager, or `start()` / `stop()`.
    """

    pid: int
    interval_s: float = 0.2
    classify: Classify = bentoml_role
    samples: list[tuple[float, dict[str, Usage]]] = field(default_factory=list)
    peak_rss_bytes: int = 0
    peak_at: float | None = None
    peak_rss_by_role: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tree-sampler-{self.pid}", daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> TreeSampler:
        """Stop sampling (takes one last sample first) and wait for the thread."""
        self._stop.set()
        self._thread.join()
        return self

    def sample(self) -> dict[str, Usage]:
        """Take one sample now and update the peaks."""
        import psutil

        try:
            usage = sample_tree(self.pid, self.classify)
        except psutil.NoSuchProcess:  # the server has gone: nothing more to see
            return {}
        now, total = time.perf_counter(), sum(u.rss_bytes for u in usage.values())
        self.samples.append((now, usage))
        if total > self.peak_rss_bytes:
            self.peak_rss_bytes, self.peak_at = total, now
        for role, u in usage.items():
            self.peak_rss_by_role[role] = max(self.peak_rss_by_role.get(role, 0), u.rss_bytes)
        return usage

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
        self.sample()

    def __enter__(self) -> TreeSampler:
        self.sample()
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
