"""The follower on its own: one poll step at a time, real Keras models, an in-memory source."""

from __future__ import annotations

import numpy as np
import pytest

from imgcls.modelcard import ModelCard
from service.follower import Follower, ModelRejected, Served, check_model, prepare
from service.predictor import Predictor
from service.replies import Upload, classify_uploads
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


def test_an_upload_decoded_for_a_model_swapped_out_is_decoded_again_for_the_one_that_answers(versions):
    """Uploads decoded on arrival at the served size (a GPU computes meanwhile) and uploads
    not decoded yet (on the CPU: the batch decodes them); the batch's model answers all of
    them, decoding again from the bytes an upload prepared for another input size."""
    from imgcls.images import model_input
    from service.settings import ServiceSettings
    from service.uploads import Decoder
    from tests.service_fixtures import colour_image, encode

    decoder = Decoder(ServiceSettings())
    decodes = []
    decode = decoder.model_input
    decoder.model_input = lambda data, size, since=None: decodes.append(size) or decode(data, size, since)
    data = encode(colour_image("red", (64, 48)), "PNG")
    fresh, stale = Upload(data, 2), Upload(data, 3)
    fresh.decode(decoder, (32, 32))
    stale.decode(decoder, (40, 40))  # prepared before a swap to a 32 x 32 model
    broken = Upload(b"not an image", 1)
    broken.decode(decoder, (32, 32))
    replies = classify_uploads(versions["2"], [fresh, stale, broken], decoder, step=1)
    assert [r.get("version") for r in replies[:2]] == ["2", "2"]
    assert [len(r["predictions"]) for r in replies[:2]] == [2, 3]
    assert replies[0]["predictions"][0]["label"] in ["rot", "gruen", "blau"]
    assert replies[0]["predictions"] == replies[1]["predictions"][:2]  # the same pixels again
    assert np.array_equal(stale.pixels, model_input(data, (32, 32)))
    assert replies[0]["batch"] == 1  # forward passes of at most `step` images
    assert replies[2]["status"] == 400 and "error" in replies[2]
    assert decodes == [(32, 32), (40, 40), (32, 32), (32, 32)]  # once each; the stale one again
    decodes.clear()
    later = [Upload(data, 1), Upload(b"not an image", 1), Upload(data, 2)]  # not decoded yet
    replies = classify_uploads(versions["2"], later, decoder, step=8)
    assert decodes == [(32, 32)] * 3 and replies[1]["status"] == 400
    assert replies[0]["predictions"] == replies[2]["predictions"][:1] == fresh.reply["predictions"][:1]
    assert classify_uploads(versions["2"], [Upload(data, 1)], decoder, step=8)[0]["version"] == "2"  # one: inline

    def failing(data, size, since=None):
        raise RuntimeError("a decoder bug")

    decoder.model_input = failing  # an unexpected error fails its own image, not the batch
    other = Upload(data, 1)
    other.decode(decoder, (40, 40))
    replies = classify_uploads(versions["2"], [other, fresh], decoder, step=8)
    assert replies[0]["status"] == 500 and "RuntimeError" in replies[0]["error"]
    assert replies[1]["version"] == "2"
    decoder.close()


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
