"""LitServe 0.2.19 serving the benchmark's model with dynamic batching, as its docs show:
`LitAPI(max_batch_size=..., batch_timeout=...)`, `predict` over the batch.

    python -m bench.peers.litserve_app --model M.keras --size 224 --classes a,b,... --port P
                                       [--runtime keras|openvino] [--precision f32|bf16]

LitServe parses the multipart form in its API server process and hands it to the
inference worker, which decodes each upload (`decode_request`), batches and predicts.
"""

from __future__ import annotations

import litserve as ls

from bench.peers import parse, work


class ImageAPI(ls.LitAPI):
    def __init__(self, args, **batching):
        super().__init__(**batching)
        self.args = args

    def setup(self, device) -> None:
        work.name_this_process()
        self.predict_batch = work.load_predict(self.args.model, self.args.runtime, self.args.precision)
        work.warm_up(self.predict_batch, self.args.size)

    def decode_request(self, request):
        return work.model_input(request["image"].file.read(), self.args.size)

    def batch(self, inputs):
        return list(inputs)  # predict stacks them itself

    def predict(self, images):
        return work.answers(self.predict_batch, images, self.args.class_names)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


def main(argv: list[str] | None = None) -> None:
    args = parse(__doc__, argv)
    api = ImageAPI(args, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", timeout=120)
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
