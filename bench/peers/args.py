"""The command line every peer server takes."""

from __future__ import annotations

import argparse

# What the peers' docs show for dynamic batching: a batch of up to 32 (the service's
# default), waiting up to 10 ms for it to fill (Ray Serve's default batch_wait_timeout_s,
# and the LitServe setting of issue 10).
MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.01


def parse(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="the .keras file to serve")
    parser.add_argument("--size", type=int, required=True, help="the model's input size (square)")
    parser.add_argument("--classes", required=True, help="comma-separated class names, in output order")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument("--batch-timeout", type=float, default=BATCH_TIMEOUT_S, help="seconds")
    parser.add_argument("--runtime", choices=["keras", "openvino"], default="keras",
                        help="keras: predict_on_batch on the file (default); openvino: its OpenVINO "
                        "build, compiled with the service's settings")  # fmt: skip
    parser.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                        help="precision of the OpenVINO build (f32)")  # fmt: skip
    args = parser.parse_args(argv)
    args.class_names = args.classes.split(",")
    return args
