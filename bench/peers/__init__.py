"""The servers a user would pick instead of imgcls serve, set up as their docs recommend
for dynamic batching, doing the service's work on the same `.keras` file (bench.serve_bench).

    python -m bench.peers.litserve_app --model M.keras --size 224 --classes a,b,c --port P
    python -m bench.peers.ray_app      --model M.keras --size 224 --classes a,b,c --port P

Each accepts the upload the service takes (POST /predict, multipart field `image`), decodes
it with imgcls.images.decode_image + prepare_image, batches, calls `predict_on_batch` (or,
with `--runtime openvino`, the file's OpenVINO build compiled as the service compiles it) and
answers `{"predictions": [{"label", "probability"}, ...]}` (the top 3), so the load
generator's `predict_load` drives them unchanged. Pinned in bench/peers/requirements.txt
(`make bench-serve` installs it). `parse` reads the command line every peer takes.
"""

from __future__ import annotations

import argparse

# The model process's name (/proc/PID/comm, 15 bytes at most), set by work.name_this_process,
# so bench.sampling.peer_role splits CPU per image into front and model as for the service.
MODEL_PROCESS_NAME = "imgcls-peer-mdl"

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
