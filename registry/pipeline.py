"""`run_pipeline`: validate -> train -> evaluate -> register -> gate -> promote, as one call.

Outcomes a scheduler can tell apart (see `EXIT_*`): a new champion, a registered version
that did not pass the gate, bad input, or any other error. A pipeline stopped after the
version was registered leaves it tagged `interrupted` (or `failed`), never champion; one
stopped after the alias moved to it reports the promotion (`InterruptedAfterPromotion`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module to build its parser: keep it light
    from imgcls.settings import TrackingSettings
    from registry.settings import RegistrySettings
    from registry.steps import Outcome
    from training.config import TrainConfig

log = logging.getLogger(__name__)

EXIT_PROMOTED = 0  # a new champion was promoted
EXIT_ERROR = 1  # anything else went wrong
EXIT_BAD_INPUT = 2  # bad config or dataset; the message names the field or path
EXIT_NOT_PROMOTED = 3  # trained and registered, but the gate kept the champion
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM (128 + SIGINT, the shell convention)


class InterruptedAfterPromotion(KeyboardInterrupt):
    """Ctrl-C / SIGTERM arrived after `version` had become champion: the promotion stands."""

    def __init__(self, version: str):
        super().__init__(f"interrupted after version {version} became champion")
        self.version = version


@dataclass
class PipelineOutcome:
    """The run, the registered version and the gate's decision."""

    result: object  # training.train.TrainResult
    version: str
    decision: Outcome

    @property
    def exit_code(self) -> int:
        return EXIT_PROMOTED if self.decision.passed else EXIT_NOT_PROMOTED


def run_pipeline(
    config: TrainConfig, tracking: TrackingSettings, settings: RegistrySettings
) -> PipelineOutcome:
    """Train on `config`, register the model and promote it if it beats the champion."""
    from registry.promote import promote_if_better
    from registry.register import connect, register_candidate
    from training.train import train

    client = connect(tracking)  # fail on an unreachable store before hours of training
    result = train(config, tracking)
    version = register_candidate(settings, result.model_uri, result.run_id, result.card, result.metrics)
    with status_on_failure(client, settings, version):
        decision = promote_if_better(client, tracking, settings, version, result.scan, result.evaluation)
    return PipelineOutcome(result, version, decision)


@contextlib.contextmanager
def status_on_failure(client, settings: RegistrySettings, version: str):
    """Tag the version `interrupted` / `failed` if the block raises before it became champion.

    The registry decides, not the exception: a version the alias already points at is left
    alone, and an interrupt that came after its promotion becomes `InterruptedAfterPromotion`.
    """
    try:
        yield
    except BaseException as exc:
        champion = _champion_or_unknown(client, settings)
        if champion == version:
            log.warning(
                "version %s is %s: its promotion completed before the %r", version, settings.alias, exc
            )
            if isinstance(exc, KeyboardInterrupt):
                raise InterruptedAfterPromotion(version) from exc
            raise
        from registry.register import set_status

        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        if champion is _UNKNOWN:
            log.warning("version %s: the registry could not be read, so it is not tagged %s", version, status)
            raise
        log.warning("version %s stays unpromoted (%s)", version, status)
        with contextlib.suppress(Exception):
            set_status(client, settings, version, status)
        raise


_UNKNOWN = object()


def _champion_or_unknown(client, settings: RegistrySettings):
    """The champion version (None if there is none), or `_UNKNOWN` when it cannot be read."""
    from registry.versions import champion_version

    try:
        return champion_version(client, settings)
    except Exception:  # noqa: BLE001 - the caller only needs to know it cannot tell
        return _UNKNOWN
