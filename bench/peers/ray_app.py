"""Ray Serve 2.60 serving the benchmark's model with dynamic batching, as its docs show:
`@serve.batch(max_batch_size=..., batch_wait_timeout_s=...)` on the deployment's method,
and `max_ongoing_requests` above the batch size so a full batch can reach the replica.

    python -m bench.peers.ray_app --model M.keras --size 224 --classes a,b,... --port P

A local Ray cluster (2 CPUs, no dashboard) with one replica; Ray's HTTP proxy reads the
multipart form, the replica decodes each upload and predicts on the batch. Runs until
SIGTERM or SIGINT, then shuts Serve and Ray down.
"""

from __future__ import annotations

import signal
import threading

from starlette.requests import Request

from bench.peers import parse, work


def build_app(args):
    from ray import serve

    @serve.deployment(
        num_replicas=1,
        # The model may use both cores: Ray sets OMP_NUM_THREADS from num_cpus.
        ray_actor_options={"num_cpus": 2},
        max_ongoing_requests=4 * args.max_batch_size,
    )
    class ImageModel:
        def __init__(self) -> None:
            work.name_this_process()
            self.predict = work.load_predict(args.model, args.runtime, args.precision)
            work.warm_up(self.predict, args.size)

        @serve.batch(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_timeout)
        async def classify(self, uploads: list[bytes]) -> list[dict]:
            images = [work.model_input(data, args.size) for data in uploads]
            return work.answers(self.predict, images, args.class_names)

        async def __call__(self, request: Request) -> dict:
            if request.url.path.rstrip("/").endswith("/health"):
                return {"ok": True}
            form = await request.form()
            return await self.classify(await form["image"].read())

    return ImageModel.bind()


def main(argv: list[str] | None = None) -> None:
    import ray
    from ray import serve

    args = parse(__doc__, argv)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args), route_prefix="/")
        stopping.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
