"""The `imgcls` command's noise filters: only lines a user cannot act on are dropped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_native_stderr_filter_drops_only_the_known_noise():
    script = textwrap.dedent("""
        import os, sys, warnings
        from imgcls.terminal import NativeStderrFilter, hide_python_noise
        hide_python_noise()
        NativeStderrFilter().start()
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
        os.write(2, b"I0000 00:00:1796118406.980233   32578 port.cc:153] oneDNN custom operations are on. x\\n")
        os.write(2, b"E0000 00:00:1.2   7 node_def_util.cc:682] NodeDef mentions attribute use_unbounded_threadpool which\\n")
        os.write(2, b"E0000 00:00:1.2   7 other.cc:1] a real native error\\n")
        warnings.warn("Your input ran out of data; interrupting training. Make sure", UserWarning)
        warnings.warn("heavy class imbalance: consider class_weight: balanced", UserWarning)
        print("3 file(s) left out", file=sys.stderr)
        sys.stderr.write("no newline at the end")
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=os.getcwd()
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert not [x for x in lines if "absl" in x or "oneDNN" in x or "use_unbounded" in x or "ran out" in x]
    assert "E0000 00:00:1.2   7 other.cc:1] a real native error" in lines
    assert any("heavy class imbalance" in x for x in lines) and "3 file(s) left out" in lines
    assert lines[-1] == "no newline at the end"


def test_prints_and_log_lines_stay_whole_and_in_order():
    """As `imgcls.cli.main` sets the terminal up, under PYTHONUNBUFFERED (Docker, CI): a log line
    never lands inside a printed one (`make demo` showed "...mlflow.db20:56:38 INFO"), and
    the two come out in the order they were written."""
    script = textwrap.dedent("""
        import logging, sys, time
        from imgcls import terminal
        stream = terminal.NativeStderrFilter().start().log_stream()
        terminal.whole_lines(sys.stdout)
        logging.basicConfig(stream=stream, level=logging.INFO, format="%(levelname)s %(message)s")
        for i in range(40):
            logging.getLogger("x").info("log line %d", i)
            print(f"print line {i} in sqlite:///.imgcls/mlflow.db")
            time.sleep(0.002)  # the filter's relay runs meanwhile, as in a real run
    """)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=60, cwd=os.getcwd(), env=env)  # fmt: skip
    assert out.returncode == 0, out.stdout
    expected = [
        line
        for i in range(40)
        for line in (f"INFO log line {i}", f"print line {i} in sqlite:///.imgcls/mlflow.db")
    ]
    assert out.stdout.splitlines() == expected
