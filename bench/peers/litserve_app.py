"""LitServe 0.2.19 serving the benchmark's model with dynamic batching, as its docs show:
`LitAPI(max_batch_size=..., batch_timeout=...)`, `predict` over the batch.

    python -m bench.peers.litserve_app --model M.keras --size 224 --classes a,b,... --port P

LitServe parses the multipart form in its API server process and hands it to the
inference worker, which decodes each upload (`decode_request`), batches and predicts.
"""

from __future__ import annotations

import litserve as ls

from bench.peers import args as cli
from bench.peers import work


class ImageAPI(ls.LitAPI):
    def __init__(self, model_path: str, size: int, class_names: list[str], **batching):
        super().__init__(**batching)
        self.model_path, self.size, self.class_names = model_path, size, class_names

    def setup(self, device) -> None:
        work.name_this_process()
        self.model = work.load_model(self.model_path)
        work.warm_up(self.model, self.size)

    def decode_request(self, request):
        return work.model_input(request["image"].file.read(), self.size)

    def batch(self, inputs):
        return list(inputs)  # predict stacks them itself

    def predict(self, images):
        return work.answers(self.model, images, self.class_names)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(__doc__, argv)
    api = ImageAPI(
        args.model,
        args.size,
        args.class_names,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(api, accelerator="cpu", timeout=120)
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
