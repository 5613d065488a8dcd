"""The follower on its own: one poll step at a time, real Keras models, an in-memory source."""

from __future__ import annotations

import numpy as np
import pytest

from imgcls.modelcard import ModelCard
from service.follower import Follower, ModelRejected, Served, check_model, prepare
from service.predictor import Predictor
from service.replies import classify_replies, one_version
from tests.service_fixtures import build_tiny_model, tiny_card


class MemorySource:
    """A champion pointer and its versions, in memory; `down` makes every read fail."""

    kind = "memory"

    def __init__(self, versions: dict[str, Predictor], champion: str):
        self.versions, self.key, self.down, self.loads = versions, champion, False, []

    def champion(self) -> str:
        if self.down:
            raise ConnectionError("registry unreachable")
        return self.key

    def load(self, key: str) -> Predictor:
        self.loads.append(key)
        return self.versions[key]


@pytest.fixture(scope="module")
def versions() -> dict[str, Predictor]:
    model = build_tiny_model()
    renamed = tiny_card().model_copy(update={"class_names": ["rot", "gruen", "blau"]})
    broken = tiny_card().model_copy(update={"class_names": ["a", "b", "c", "d"]})  # 3 outputs
    return {
        "1": Predictor(model, tiny_card(), "1"),
        "2": Predictor(model, renamed, "2"),
        "3": Predictor(model, broken, "3"),
    }


def follower(versions, champion="1") -> tuple[Follower, MemorySource]:
    source = MemorySource(versions, champion)
    return Follower(source, Served(prepare(versions[champion]), champion, "memory"), 1.0), source


def test_a_new_champion_is_swapped_in_and_a_running_request_keeps_its_model(versions):
    follow, source = follower(versions)
    running = follow.served  # a request read the model before the swap
    source.key = "2"
    assert follow.check() is True
    assert follow.served.predictor.version == "2" and running.predictor.version == "1"
    assert follow.check() is False  # nothing new
    change = follow.status()["class_set_changes"][0]
    assert change["added"] == ["rot", "gruen", "blau"] and change["removed"] == ["red", "green", "blue"]
    assert follow.status()["swaps"] == 1
    assert follow.status()["last_load_s"] >= 0  # how long the swap's load, check and warm-up took


def test_a_version_that_fails_its_checks_is_never_served_and_retried_with_backoff(versions):
    follow, source = follower(versions)
    source.key = "3"
    assert follow.check(now=0.0) is False
    assert follow.served.predictor.version == "1"
    status = follow.status()
    assert status["failed_loads"] == 1 and "4 classes" in status["last_error"]
    assert follow.check(now=0.5) is False and source.loads == ["3"]  # backing off: no reload
    assert follow.check(now=1.5) is False and source.loads == ["3", "3"]  # retried after 1 s
    assert follow.check(now=2.5) is False and source.loads == ["3", "3"]  # next wait is 2 s
    source.key = "2"  # another version is tried at once
    assert follow.check(now=2.6) is True and follow.served.predictor.version == "2"


def test_an_unreachable_registry_keeps_the_served_model(versions):
    follow, source = follower(versions)
    source.down = True
    assert follow.check() is False
    assert follow.served.predictor.version == "1"
    assert "unreachable" in follow.status()["last_error"]


def test_check_model_compares_the_model_with_its_card(versions):
    check_model(versions["1"])
    with pytest.raises(ModelRejected, match="3 outputs"):
        check_model(versions["3"])
    card = ModelCard(class_names=["a", "b", "c"], image_size=(40, 40), backbone="x")
    with pytest.raises(ModelRejected, match=r"\(40, 40\)"):
        check_model(Predictor(versions["1"].model, card, "4"))


def test_replies_name_their_version_and_images_of_another_size_are_stale(versions):
    images = [
        [np.zeros((40, 40, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)],
        [np.zeros((40, 40, 3), np.uint8)],
    ]
    replies = classify_replies(versions["2"], images)  # candidates per image: one fits, none fits
    assert replies[0]["version"] == "2" and replies[0]["class_names"] == ["rot", "gruen", "blau"]
    assert replies[0]["probabilities"].shape == (3,) and replies[0]["batch"] == 1
    assert replies[1]["stale"] and replies[1]["image_size"] == [32, 32]
    assert not one_version(replies)
    assert one_version(replies[:1])
    assert not one_version([replies[0], {**replies[0], "version": "1"}])


def test_bentoml_source_follows_the_entry_the_registry_labels_champion(tmp_path):
    """--source bentoml: the store entry labelled alias=champion, read again at each poll."""
    from service.settings import ServiceSettings
    from service.sources import build_follower
    from service.store import save_to_bento_store

    path = tmp_path / "m.keras"
    build_tiny_model().save(path)
    labels = {"registered_model": "shapes", "alias": "champion"}
    first = save_to_bento_store(path, tiny_card(), "shapes", 7, labels)
    follow = build_follower(ServiceSettings(source="bentoml", model_name="shapes", poll_interval_s=5))
    assert follow.served.predictor.version == "7" and follow.poll_interval_s == 5
    assert follow.check() is False
    save_to_bento_store(path, tiny_card(), "shapes", 8, labels)  # the registry's next champion
    import bentoml

    bentoml.models.delete(first)  # ... and it retires the earlier one
    assert follow.check() is True and follow.served.predictor.version == "8"
    pinned = build_follower(ServiceSettings(source="bentoml", model_name="shapes", version="8"))
    assert pinned.served.predictor.version == "8" and pinned.poll_interval_s == 0


def test_a_front_prepares_the_sizes_answered_lately_newest_first():
    from service.replies import InputSizes

    now = [0.0]
    sizes = InputSizes(keep_s=60, clock=lambda: now[0])
    sizes.heard([32, 32])
    assert sizes.current() == [(32, 32)]
    now[0] = 1.0
    sizes.heard([40, 40])  # one worker swapped: both sizes while the workers disagree
    assert sizes.current() == [(40, 40), (32, 32)]
    now[0] = 30.0
    sizes.heard([40, 40])
    assert sizes.current() == [(40, 40), (32, 32)]
    now[0] = 62.0  # no answer named 32x32 for over a minute
    assert sizes.current() == [(40, 40)]
