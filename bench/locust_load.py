"""The benchmarks' HTTP load, run by Locust's library API in a process of its own (gevent
patches the process that imports it). Started by bench.loadgen.Locust:

    python -m bench.locust_load      # stdin: the spec line, then "go"; stdout: the lines

The spec (a JSON line): `url`; `cycle`, request `i` being `cycle[i % len(cycle)]` ({"path",
"files": [[field, filename, file, type], ...] or "body" (a file) and "content_type",
"expect": "200" | "4xx" | "any", "predictions": true (a 200 must carry them; its `version`
is kept), "label" (leads its errors), "on_503": seconds to wait or "retry-after"});
`concurrency` (users); `requests`, `duration_s` (neither: until SIGTERM or SIGINT, then
no new request starts); `rate_per_s` (an open loop, else a closed one); `timeout_s`.

Out: {"ready": true}, then per request [index, start, end, status, version, error] from
Locust's `request` event with its raw `response_time`, and last {"started", "ended",
"cpu_s", "cpu_warning"}. Times are `time.perf_counter()`: CLOCK_MONOTONIC on Linux, one
clock for the machine, the parent's too.
"""

# isort: off
from locust import FastHttpUser, constant, task  # first: gevent patches the process here
# isort: on

import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.exception import StopUser  # noqa: E402


class Plan:
    """Which request goes next and when: a closed loop hands out indexes until `requests`
    or `duration_s`; an open loop also gives each index its due time, `t0 + i / rate`."""

    def __init__(self, spec: dict) -> None:
        self.spec, self.counter, self.stopped = spec, itertools.count(), False

    def start(self) -> None:
        self.t0 = time.perf_counter()
        duration = self.spec["duration_s"]
        self.end = self.t0 + (float("inf") if duration is None else duration)

    def stop(self, *_) -> None:  # a signal handler
        self.stopped = True

    def next(self) -> tuple[int, float | None] | None:
        """(index, due time or None), or None once the load is over."""
        i, rate, requests = next(self.counter), self.spec["rate_per_s"], self.spec["requests"]
        due, done = self.t0 + i / rate if rate else None, requests is not None and i >= requests
        if self.stopped or done or (due or time.perf_counter()) >= self.end:
            return None
        return i, due


@functools.cache
def read(path: str) -> bytes:
    return Path(path).read_bytes()


def prepared(request: dict) -> dict:
    """A cycle entry as keyword arguments of FastHttpSession.request, each file read once."""
    if "files" in request:
        return {"files": [(field, (name, read(path), kind)) for field, name, path, kind in request["files"]]}
    return {"data": read(request["body"]), "headers": {"Content-Type": request["content_type"]}}


def judged(request: dict, status: int | None, response, exception) -> tuple[str | None, str | None]:
    """(version, error) of one answer, by what its cycle entry expects."""
    label = f"{request['label']}: " if request.get("label") else ""
    if status is None:
        return None, f"{label}{type(exception).__name__}: {exception}"[:200]
    expect = request.get("expect", "200")
    if expect == "200" and status != 200 or expect == "4xx" and not 400 <= status < 500:
        return None, f"{label}HTTP {status}: {(response.text or '')[:150]}"
    if not request.get("predictions") or status != 200:
        return None, None
    try:
        body = response.json()
    except ValueError:
        return None, f"{label}not JSON: {(response.text or '')[:150]}"
    version = None if body.get("version") is None else str(body["version"])
    return version, None if body.get("predictions") else f"{label}no predictions: {response.text[:150]}"


def user_class(spec: dict, plan: Plan) -> type:
    """The one kind of user: claims the plan's next request, sends it, repeats at once."""
    cycle, kwargs = spec["cycle"], [prepared(request) for request in spec["cycle"]]

    class Client(FastHttpUser):
        host = spec["url"]
        wait_time = constant(0)
        network_timeout = connection_timeout = spec["timeout_s"]
        concurrency = 1  # one request at a time per user: one connection each

        @task
        def send(self) -> None:
            if (claim := plan.next()) is None:
                raise StopUser
            i, due = claim
            if due is not None:
                gevent.sleep(max(0.0, due - time.perf_counter()))
                if plan.stopped:
                    raise StopUser
            request = cycle[i % len(cycle)]
            sent = time.perf_counter()
            context = {"index": i, "start": sent if due is None else due, "sent": sent}
            answer = self.client.request("POST", request["path"], context=context, **kwargs[i % len(cycle)])
            wait = request.get("on_503")
            if answer.status_code == 503 and wait is not None:
                headers = answer.headers or {}
                gevent.sleep(float(headers.get("retry-after", 1)) if wait == "retry-after" else wait)

    return Client


def recorder(cycle: list[dict]):
    """The `request` event listener: one line per request; an open loop's start is its
    due time, so a wait for a free user counts in its latency (no coordinated omission)."""

    def on_request(response_time, response, context, exception, **_) -> None:
        i = context["index"]
        status = (response.status_code or None) if response is not None else None
        version, error = judged(cycle[i % len(cycle)], status, response, exception)
        end = context["sent"] + response_time / 1000
        # flushed: the parent watches answers as they come (bench.rollout.wait_switched)
        print(json.dumps([i, context["start"], end, status, version, error]), flush=True)

    return on_request


def cpu_s() -> float:
    return sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system


def main() -> None:
    """Read the spec, say ready, wait for "go", run the load, write the summary line."""
    logging.basicConfig(level=logging.ERROR)
    spec = json.loads(sys.stdin.readline())
    plan = Plan(spec)
    env = Environment(user_classes=[user_class(spec, plan)])
    env.events.request.add_listener(recorder(spec["cycle"]))
    runner = env.create_local_runner()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, plan.stop)
    print('{"ready": true}', flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    cpu0 = cpu_s()
    plan.start()
    runner.start(spec["concurrency"], spawn_rate=spec["concurrency"])
    runner.spawning_greenlet.join()
    runner.user_greenlets.join()
    summary = {"started": plan.t0, "ended": time.perf_counter(), "cpu_s": cpu_s() - cpu0}
    summary["cpu_warning"] = runner.cpu_warning_emitted
    runner.quit()
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
