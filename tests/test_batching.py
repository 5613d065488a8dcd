"""The bounded-wait batching policy and its batcher, deterministic: no timing assertions."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.batching import Batcher, Overloaded, Policy, decide

POLICY = Policy(max_batch_size=8, max_wait_s=0.0, deadline_s=10.0)


def test_an_idle_model_takes_whatever_queued_at_once():
    assert decide(1, 0.0, busy=False, policy=POLICY) == 0.0
    assert decide(5, 0.0, busy=False, policy=POLICY) == 0.0
    assert decide(5, 0.0, busy=True, policy=POLICY) == float("inf")  # the batch runs
    assert decide(0, 0.0, busy=False, policy=POLICY) == float("inf")  # nothing to do


def test_a_wait_for_companions_is_bounded_by_max_wait():
    policy = Policy(max_batch_size=8, max_wait_s=0.002)
    assert decide(1, 0.0, busy=False, policy=policy) == pytest.approx(0.002)
    assert decide(1, 0.0015, busy=False, policy=policy) == pytest.approx(0.0005)
    assert decide(1, 0.002, busy=False, policy=policy) == 0.0  # waited enough
    assert decide(8, 0.0, busy=False, policy=policy) == 0.0  # full: no wait at all


class HeldModel:
    """`run` blocks until released, and records every batch it was given."""

    def __init__(self):
        self.release, self.batches = threading.Event(), []

    def __call__(self, items: list) -> list:
        self.release.wait(10)
        self.batches.append(list(items))
        return [f"out-{item}" for item in items]


def test_a_lone_request_after_a_burst_is_dispatched_alone_and_at_once():
    model, seen = HeldModel(), []

    async def scenario():
        batcher = Batcher(model, POLICY, on_batch=lambda n, _w: seen.append(n))
        first = asyncio.create_task(batcher.submit([0]))
        await asyncio.sleep(0)  # dispatched to the (held) model
        while not seen:
            await asyncio.sleep(0.001)
        burst = [asyncio.create_task(batcher.submit([i])) for i in range(1, 10)]
        await asyncio.sleep(0.01)
        model.release.set()
        results = [await first] + [await t for t in burst]
        lone = await batcher.submit([99])  # after the burst, with nothing else queued
        batcher.close()
        return results, lone, batcher

    results, lone, batcher = asyncio.run(scenario())
    assert [r[0] for r in results] == [f"out-{i}" for i in range(10)]
    assert lone == ["out-99"]
    # 1 alone, then the 9 that queued meanwhile in batches of at most 8, then the lone one.
    assert [len(b) for b in model.batches] == [1, 8, 1, 1]
    # The policy keeps no memory of the burst: the lone request is dispatched at once.
    assert decide(1, 0.0, busy=False, policy=batcher.policy) == 0.0


def test_the_images_waiting_are_reported_as_they_queue_and_leave():
    model, queued = HeldModel(), []

    async def scenario():
        batcher = Batcher(model, POLICY, on_queue=queued.append)
        first = asyncio.create_task(batcher.submit([0]))
        while not queued or queued[-1] != 0:  # queued, then taken by the (held) model
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(batcher.submit([1, 2])) for _ in range(3)]
        while len(queued) < 5:
            await asyncio.sleep(0.001)
        model.release.set()
        await asyncio.gather(first, *rest)
        batcher.close()

    asyncio.run(scenario())
    assert queued == [1, 0, 2, 4, 6, 4, 2, 0]  # up one call at a time, down as the batch takes them


def test_a_request_stays_in_one_batch_in_order_and_a_big_one_goes_alone():
    model = HeldModel()
    model.release.set()

    async def scenario():
        batcher = Batcher(model, Policy(max_batch_size=4))
        out = await asyncio.gather(batcher.submit([1, 2, 3]), batcher.submit(list(range(10, 16))))
        batcher.close()
        return out

    small, big = asyncio.run(scenario())
    assert small == ["out-1", "out-2", "out-3"] and big == [f"out-{i}" for i in range(10, 16)]
    assert sorted(len(b) for b in model.batches) == [3, 6]  # never split, never mixed past the size


def test_requests_past_the_deadline_are_refused_not_computed():
    model, now = HeldModel(), [0.0]
    model.release.set()

    async def scenario():
        batcher = Batcher(model, Policy(max_batch_size=4, deadline_s=5.0), clock=lambda: now[0])
        batcher._busy = True  # the model is busy with another batch while this one queues
        task = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0.01)
        now[0] = 6.0
        batcher._busy = False
        batcher._changed.set()
        with pytest.raises(Overloaded, match="over the deadline"):
            await task
        batcher.close()

    asyncio.run(scenario())
    assert model.batches == []


def test_a_failing_batch_fails_each_of_its_requests():
    def broken(items):
        raise ValueError("model exploded")

    async def scenario():
        batcher = Batcher(broken, POLICY)
        results = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
        batcher.close()
        return results

    assert all(isinstance(r, ValueError) for r in asyncio.run(scenario()))
