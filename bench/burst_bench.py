"""Latency at low load after bursts: concurrency 1, 32, 1, 32, 1 against the service alone.

    python -m bench.burst_bench [--models resnet50,demo] [--rounds 2] [--out FILE]

BentoML 1.4's adaptive batching learned a wait from past queueing, so a lone request
after a burst waited 3-6x longer (issue 10); the service's own batcher (service/batching.py)
keeps no memory. This is bench.serve_bench on the service alone (`--servers imgcls`), one
round of `--rounds` x [c=1, c=32] and a last c=1, with the model's own batch-1 latency in
process (the engine the service computes with) just before each c=1 level. Target: every
c=1 p50 within 5 ms of that, before and after the bursts. Prints serve_bench's report and
that check; writes serve_bench's JSON.
"""

from __future__ import annotations

from bench import harness, report, serve_bench


def parse_args(argv: list[str] | None = None):
    """This command's options, as the serve_bench options they stand for."""
    p = harness.parser(__doc__, "burst_bench.json", front_workers=serve_bench.FRONT_WORKERS)
    p.add_argument("--models", default="resnet50,demo", help="comma-separated cases: resnet50, demo")
    p.add_argument("--rounds", type=int, default=2, help="[c=1, c=32] rounds before the last c=1 (2)")
    args = p.parse_args(argv)
    levels = ",".join(["1,32"] * args.rounds + ["1"])
    served = ["--servers", "imgcls", "--rounds", "1", "--levels", levels, "--models", args.models]
    served += [
        "--out",
        str(args.out),
        "--shared",
        str(args.shared),
        "--front-workers",
        str(args.front_workers),
    ]
    return serve_bench.parse_args(served + (["--logs", str(args.logs)] if args.logs else []))


def lone_checks(results: dict) -> list[str]:
    """PASS/FAIL per case: every c=1 p50 within MAX_ADDED_MS of the model's own just before it."""
    lines = []
    for key, result in results["results"].items():
        lone = report.rows_of(result, "imgcls", concurrency=1)
        added = [r["p50_ms"] - report.own_batch1_ms(result, r["round"], r["step"]) for r in lone]
        ok = all(x <= report.MAX_ADDED_MS for x in added)
        lines.append(f"{'PASS' if ok else 'FAIL'} {key}: every c=1 p50 within {report.MAX_ADDED_MS:g} ms of the "
                     f"model's own batch-1 p50 just before it ({report.engine(result, 'imgcls')}): "
                     f"{', '.join(f'{x:+.1f}' for x in added)} ms")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    harness.run("burst-bench", args, lambda work, stop: serve_bench.measure(args, work, stop),
                lambda results: "\n".join([report.render(results), "", *lone_checks(results)]),
                report.with_targets)  # fmt: skip


if __name__ == "__main__":
    main()
