"""Settings of the prediction service, read from `IMGCLS_SERVE_*` variables (or `.env`).

`imgcls serve` turns its options into these variables, so the BentoML server processes
(which import `service.service` on their own) see the same values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "IMGCLS_SERVE_"


class ServiceSettings(BaseSettings):
    """How the service finds its model and how much work it accepts per request."""

    # populate_by_name: `ServiceSettings(model_name=...)` works besides the env aliases.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", populate_by_name=True
    )

    source: Literal["bentoml", "mlflow"] = Field(
        "bentoml",
        description="Where the champion comes from: the BentoML model store or the MLflow "
        "registry (models:/<name>@<alias>).",
    )
    # The registry's own variables come after ours, so the service looks for the name the
    # registry registers (registry.settings.RegistrySettings.model_name) unless told otherwise.
    model_name: str = Field(
        "image-classifier",
        validation_alias=AliasChoices(
            "IMGCLS_SERVE_MODEL_NAME", "IMGCLS_REGISTRY_MODEL_NAME", "IMGCLS_REGISTERED_MODEL_NAME"
        ),
        description="Registered model name (MLflow) and, unless bento_model_name is set, the "
        "BentoML model name.",
    )
    bento_model_name: str | None = Field(
        None,
        validation_alias=AliasChoices("IMGCLS_SERVE_BENTO_MODEL_NAME", "IMGCLS_REGISTRY_BENTO_MODEL_NAME"),
        description="BentoML model name (source=bentoml); default: model_name, as the registry does.",
    )
    alias: str = Field("champion", description="MLflow alias to serve (source=mlflow).")
    bento_tag: str | None = Field(
        None,
        description="Exact BentoML model tag (name:version); default: the entry the registry "
        "labelled as the current <alias> (the newest entry if none is labelled).",
    )
    # Seconds between two looks at the champion pointer. 10 s: a promotion reaches every
    # replica within seconds, at one cheap registry read per replica and interval.
    poll_interval_s: float = Field(
        10.0, ge=0, description="Seconds between checks of the champion; 0 turns following off."
    )
    version: str | None = Field(
        None, description="Serve this registry version and never follow (pins the replica)."
    )
    cache_dir: Path | None = Field(
        None,
        description="Local copies of the versions loaded from MLflow, served after a restart "
        "while MLflow is unreachable; default: <IMGCLS_HOME>/serve-cache.",
    )
    # auto: the OpenVINO build in the best precision that matched Keras on the version's
    # parity set here (service/compiled.py); keras: Keras computes, no build.
    runtime: Literal["auto", "keras", "openvino"] = Field(
        "auto", description="What computes predictions: auto (a verified OpenVINO build), keras, openvino."
    )
    precision: Literal["auto", "f32", "bf16"] = Field(
        "auto",
        description="Precision of the compiled build: auto (bf16 where the CPU has it and it "
        "matches Keras, else f32), f32, bf16.",
    )
    top_k: int = Field(3, ge=1, description="Default number of labels per prediction.")
    # Off by default: a threshold is a product decision (what a wrong answer costs the
    # client), not something a default can know (service/abstain.py).
    min_confidence: float | None = Field(
        None, gt=0, le=1, description="Abstain (label null) when the top probability is below this."
    )
    batching: bool = Field(True, description="Batch the requests that queue while the model is busy.")
    # 32 matches the benchmark's top concurrency; bigger batches only add latency on CPU.
    max_batch_size: int = Field(32, ge=2, description="Largest batch.")
    # 0: an idle model takes a lone request at once. A few ms can pay on a GPU, where a
    # batch of 8 costs about what one image does and requests arrive steadily.
    max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="Longest an idle model waits for companions of a lone request."
    )
    # A deadline, not a fill window: a request queued longer is refused with 503. 10 s lets
    # a CPU ResNet50 (about 1 s per batch of 32 on 2 cores) drain a full queue.
    max_latency_ms: int = Field(10_000, ge=1, description="Deadline of a queued request before a 503.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest request body; above it: 413.")
    # 40 MP covers any camera photo; a decompression bomb announces far more.
    max_pixels: int = Field(40_000_000, ge=1, description="Largest image (width x height).")
    max_batch_images: int = Field(32, ge=1, description="Most images per /predict_batch.")
    gpu: bool = Field(False, description="Declare one GPU for the model process.")
    # The front parses HTTP, checks each upload's header and answers; the model process
    # decodes. More fronts share the port; the model process stays one, so batches still
    # form in one place.
    front_workers: int = Field(1, ge=1, le=64, description="HTTP front processes (check uploads, answer).")
    # Decodes at once per model process (each front worker with --one-process): beyond it
    # a request waits decode_wait_s, then gets a 503. They run on as many threads (Pillow
    # releases the GIL): small images decode in milliseconds, so 8 keeps two cores busy.
    max_concurrent_decodes: int = Field(
        8, ge=1, le=256, description="Image decodes running at once per model process; beyond: 503."
    )
    # What the decodes of one model process may hold together, from each image's header:
    # 256 MiB lets one 40 MP image (160 MiB decoded) run beside small ones.
    decode_memory_mib: int = Field(
        256,
        ge=16,
        description="Memory the concurrent decodes of one model process may hold (MiB); beyond: 503.",
    )
    # What the uploads a model process holds at once (queued, decoding, in a batch) may
    # weigh: 512 MiB is 25 uploads at the 20 MiB limit, or thousands of photos.
    upload_memory_mib: int = Field(
        512, ge=16, description="Bytes of uploads one model process holds at once (MiB); beyond: 503."
    )
    # And each HTTP front, from reading a request's uploads to its answer: a body is held
    # as read, then as sent to the model process. 128 MiB is 6 uploads at the 20 MiB limit,
    # or thousands of photos; four fronts stay near 2 GB under worst-case uploads.
    front_upload_memory_mib: int = Field(
        128, ge=1, description="Bytes of uploads one HTTP front holds at once (MiB); beyond: 503."
    )
    # A short wait absorbs bursts of small images; a long one would only hold the
    # client's connection while big images go through.
    decode_wait_s: float = Field(
        0.5, ge=0, description="Seconds a request waits for a decode slot before its 503."
    )
    # Requests reaching the model at once per front (/predict, /predict_batch, /metadata):
    # two full batches (max_batch_size 32), one computing and one filling; more would only
    # wait in the model's queue. Beyond: 503 with Retry-After (service/shedding.py).
    max_concurrent_requests: int = Field(
        64, ge=1, le=4096, description="Predict requests running at once per front process; beyond: 503."
    )
    # The model computes one heatmap at a time (a Grad-CAM costs a few predictions and uses
    # every core while it runs): two per front, one computing and one ready behind it;
    # more would only wait, holding front threads (explain_bench: docs/benchmarks.md).
    max_concurrent_explains: int = Field(
        2, ge=1, le=256, description="/explain requests running at once per front process; beyond: 503."
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys; set: every route but the probes needs one."
    )
    api_keys_file: Path | None = Field(None, description="A file of API keys, one a line (# comments).")
    protect_probes: bool = Field(False, description="Put /metrics behind the API keys too.")
    model_workers: int = Field(
        1, ge=1, le=16, description="Model processes; each loads and follows the champion on its own."
    )
    # Off by default: two processes keep the fronts framework-free, let several fronts feed
    # one model process and are faster under load. One process saves the second hop: the
    # lowest latency at low traffic (service/link.py; docs/benchmarks.md has the figures).
    one_process: bool = Field(
        False,
        description="Hold the model in the HTTP front's process: no model process, no second "
        "hop; each front worker is then a whole replica with its own model and batches.",
    )
    port: int = Field(3000, ge=1, le=65535, description="HTTP port of `imgcls serve`.")
    host: str = Field("127.0.0.1", description="Interface `imgcls serve` binds to.")
    timeout_s: int = Field(60, ge=1, description="Per-request timeout.")
    # On SIGTERM the fronts stop accepting and let in-flight requests finish for this
    # long; 30 s covers a full batch queue on CPU (max_latency_ms is 10 s) with room.
    # `imgcls serve` kills what is left of the server KILL_MARGIN_S after it.
    graceful_timeout_s: int = Field(
        30, ge=1, description="Seconds in-flight requests get to finish after SIGTERM."
    )

    @model_validator(mode="after")
    def _one_model_per_process(self) -> ServiceSettings:
        if self.one_process and self.model_workers > 1:
            raise ValueError(
                "one_process holds the model in each front worker: use --front-workers for "
                "more replicas, not --model-workers"
            )
        return self

    def api_key_list(self) -> tuple[str, ...]:
        """The configured API keys (inline and from the file); empty: no key needed."""
        inline = self.api_keys.get_secret_value() if self.api_keys else None
        return read_keys(inline, self.api_keys_file)


def read_keys(inline: str | None, file: Path | None) -> tuple[str, ...]:
    """The keys from a comma-separated string and a file (one a line, `#` comments)."""
    keys = [k.strip() for k in (inline or "").split(",")]
    if file is not None:
        lines = Path(file).read_text().splitlines()
        keys += [line.strip() for line in lines if not line.strip().startswith("#")]
    return tuple(dict.fromkeys(k for k in keys if k))
