import asyncio
import threading
import time

import numpy as np
import pytest

from leanserve.artifact import Signature, TensorSpec
from leanserve.config import BatchingConfig
from leanserve.errors import InferenceError, InvalidInput, Overloaded, RequestTimeout
from leanserve.serve.batching import Batcher
from leanserve.serve.metrics import ServerMetrics


class RecordingSession:
    """A real Session implementation: y = x * 10, total = sum over the sequence; records batch sizes."""

    engine = "test"

    def __init__(self, variable: bool = False, delay_s: float = 0.0, fail: bool = False):
        seq = -1 if variable else 3
        self.signature = Signature((TensorSpec("x", "FP32", (-1, seq)),),
                                   (TensorSpec("y", "FP32", (-1, seq)), TensorSpec("total", "FP32", (-1, 1))))
        self.batches: list[tuple[int, ...]] = []
        self.seen: list[np.ndarray] = []
        self.delay_s = delay_s
        self.fail = fail
        self.release = threading.Event()
        self.release.set()

    def run(self, inputs, outputs=None):
        self.release.wait(5)
        self.batches.append(inputs["x"].shape)
        self.seen.append(inputs["x"].copy())
        if self.delay_s:
            time.sleep(self.delay_s)  # stands for the engine's compute time; no test waits on a clock
        if self.fail:
            raise RuntimeError("engine exploded")
        x = inputs["x"]
        result = {"y": x * 10, "total": x.sum(axis=1, keepdims=True)}
        return {k: result[k] for k in (outputs or result)}

    def close(self):
        pass


def metrics():
    return ServerMetrics().for_version("m", 1)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_merged_and_each_gets_its_own_rows():
    async def scenario():
        session = RecordingSession()
        session.release.clear()
        batcher = Batcher([session], BatchingConfig(max_batch_size=16, max_queue_delay_us=50_000), metrics())
        requests = [np.full((1 + i % 2, 3), i, np.float32) for i in range(8)]
        tasks = [asyncio.create_task(batcher.infer({"x": r})) for r in requests]
        await asyncio.sleep(0.05)
        session.release.set()
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return session, requests, results

    session, requests, results = run(scenario())
    assert sum(shape[0] for shape in session.batches) == sum(len(r) for r in requests)
    assert len(session.batches) < len(requests)
    for request, (outputs, timing) in zip(requests, results):
        np.testing.assert_array_equal(outputs["y"], request * 10)
        assert timing.batch_rows >= len(request)


def test_variable_length_inputs_are_padded_and_outputs_cut_back():
    async def scenario():
        session = RecordingSession(variable=True)
        session.release.clear()
        batcher = Batcher([session], BatchingConfig(max_batch_size=8, max_queue_delay_us=50_000, pad_values={"x": -1.0}), metrics())
        short, long = np.ones((1, 2), np.float32), np.arange(5, dtype=np.float32).reshape(1, 5)
        tasks = [asyncio.create_task(batcher.infer({"x": a})) for a in (short, long)]
        await asyncio.sleep(0.05)
        session.release.set()
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return session, results

    session, ((short_out, _), (long_out, _)) = run(scenario())
    assert session.batches == [(2, 5)]
    assert session.seen[0][0].tolist() == [1.0, 1.0, -1.0, -1.0, -1.0]  # padded with the input's pad value
    assert short_out["y"].tolist() == [[10.0, 10.0]]
    assert long_out["y"].tolist() == [[0.0, 10.0, 20.0, 30.0, 40.0]]
    assert long_out["total"].tolist() == [[10.0]]


def test_batching_off_runs_requests_one_at_a_time():
    async def scenario():
        session = RecordingSession()
        batcher = Batcher([session], BatchingConfig(enabled=False), metrics())
        await asyncio.gather(*(batcher.infer({"x": np.ones((1, 3), np.float32)}) for _ in range(5)))
        await batcher.close()
        return session

    assert run(scenario()).batches == [(1, 3)] * 5


def test_full_queue_rejects_at_once_with_overloaded():
    async def scenario():
        session = RecordingSession()
        session.release.clear()
        batcher = Batcher([session], BatchingConfig(max_batch_size=1, max_queue_size=2), metrics())
        first = [asyncio.create_task(batcher.infer({"x": np.ones((1, 3), np.float32)})) for _ in range(2)]
        await asyncio.sleep(0.05)  # one running, one queued
        first.append(asyncio.create_task(batcher.infer({"x": np.ones((1, 3), np.float32)})))
        await asyncio.sleep(0.01)  # two queued: the queue is full
        with pytest.raises(Overloaded, match="queue is full"):
            await batcher.infer({"x": np.ones((1, 3), np.float32)})
        session.release.set()
        await asyncio.gather(*first)
        await batcher.close()

    run(scenario())


def test_request_that_outlives_its_timeout_fails_clearly():
    async def scenario():
        batcher = Batcher([RecordingSession(delay_s=0.3)], BatchingConfig(timeout_ms=50), metrics())
        with pytest.raises(RequestTimeout, match="within 50 ms"):
            await batcher.infer({"x": np.ones((1, 3), np.float32)})
        await batcher.close()

    run(scenario())


def test_engine_failure_fails_that_batch_and_the_batcher_keeps_serving():
    async def scenario():
        session = RecordingSession(fail=True)
        batcher = Batcher([session], BatchingConfig(), metrics())
        with pytest.raises(InferenceError, match="engine exploded"):
            await batcher.infer({"x": np.ones((1, 3), np.float32)})
        session.fail = False
        outputs, _ = await batcher.infer({"x": np.ones((1, 3), np.float32)})
        await batcher.close()
        return outputs

    assert run(scenario())["y"].tolist() == [[10.0] * 3]


def test_inconsistent_or_oversized_batches_are_invalid():
    async def scenario():
        session = RecordingSession()
        session.signature = Signature((TensorSpec("x", "FP32", (-1, 3)), TensorSpec("z", "FP32", (-1, 3))), session.signature.outputs)
        batcher = Batcher([session], BatchingConfig(max_batch_size=4), metrics())
        with pytest.raises(InvalidInput, match="same batch size"):
            await batcher.infer({"x": np.ones((1, 3), np.float32), "z": np.ones((2, 3), np.float32)})
        with pytest.raises(InvalidInput, match="exceeds this model's max_batch_size of 4"):
            await batcher.infer({"x": np.ones((5, 3), np.float32), "z": np.ones((5, 3), np.float32)})
        await batcher.close()

    run(scenario())


def test_several_instances_run_batches_in_parallel():
    async def scenario():
        sessions = [RecordingSession(delay_s=0.2), RecordingSession(delay_s=0.2)]
        batcher = Batcher(sessions, BatchingConfig(max_batch_size=1), metrics())
        await asyncio.gather(*(batcher.infer({"x": np.ones((1, 3), np.float32)}) for _ in range(2)))
        await batcher.close()
        return sessions

    sessions = run(scenario())
    assert [len(s.batches) for s in sessions] == [1, 1]


def test_preferred_batch_size_dispatches_without_waiting_out_the_delay():
    async def scenario():
        session = RecordingSession()
        config = BatchingConfig(max_batch_size=16, max_queue_delay_us=5_000_000, preferred_batch_sizes=(4,), timeout_ms=3000)
        batcher = Batcher([session], config, metrics())
        results = await asyncio.gather(*(batcher.infer({"x": np.ones((1, 3), np.float32)}) for _ in range(4)))
        await batcher.close()
        return session, results

    session, results = run(scenario())  # with a 5 s delay and no preferred size this would time out
    assert session.batches == [(4, 3)]
    assert all(timing.batch_rows == 4 for _, timing in results)


def test_requests_are_shed_once_the_queue_wait_passes_its_budget():
    async def scenario():
        session = RecordingSession()
        session.release.clear()  # the engine is stuck on the first batch: everything behind it waits
        batcher = Batcher([session], BatchingConfig(max_batch_size=1, max_queue_wait_ms=30), metrics())
        running = asyncio.create_task(batcher.infer({"x": np.ones((1, 3), np.float32)}))
        await asyncio.sleep(0.02)
        queued = asyncio.create_task(batcher.infer({"x": np.ones((1, 3), np.float32)}))
        await asyncio.sleep(0.06)  # the queued request has now waited past its 30 ms budget
        with pytest.raises(Overloaded, match="wait over 15 ms"):
            batcher.admit()  # a newcomer is refused before anything is spent on it (at half the budget)
        session.release.set()
        await running
        with pytest.raises(Overloaded, match="waited over 30 ms in the queue"):
            await queued  # the late one is refused, not run late
        assert len(session.batches) == 1
        assert batcher._metrics.shed_queued._value.get() == 1 and batcher._metrics.overloaded._value.get() == 1
        assert (await batcher.infer({"x": np.ones((1, 3), np.float32)}))[0]["y"].shape == (1, 3)  # served again
        await batcher.close()

    run(scenario())



def test_newcomers_are_refused_at_half_the_budget_while_the_queued_are_still_served():
    # Admission stops at half the queue budget, the queue drops only past all of it: a request admitted
    # (its body read and decoded) is served, not thrown away after the work spent on it.
    async def scenario():
        session = RecordingSession()
        session.release.clear()  # the engine is stuck on the first batch
        batcher = Batcher([session], BatchingConfig(max_batch_size=1, max_queue_wait_ms=1000), metrics())
        running = asyncio.create_task(batcher.infer({"x": np.ones((1, 3), np.float32)}))
        await asyncio.sleep(0.02)
        queued = asyncio.create_task(batcher.infer({"x": np.ones((1, 3), np.float32)}))
        await asyncio.sleep(0.6)  # past half the budget (500 ms), well inside all of it
        with pytest.raises(Overloaded, match="wait over 500 ms"):
            batcher.admit()
        session.release.set()
        await running
        assert (await queued)[0]["y"].shape == (1, 3)  # served, not shed
        assert batcher._metrics.shed_queued._value.get() == 0
        await batcher.close()

    run(scenario())

def test_the_automatic_budget_serves_a_short_queue_through_a_stall_and_sheds_a_standing_one():
    async def stall(queued: int, stall_s: float) -> tuple[Batcher, RecordingSession, list]:
        session = RecordingSession()
        batcher = Batcher([session], BatchingConfig(max_batch_size=2, max_queue_delay_us=0), metrics())
        await batcher.infer({"x": np.ones((1, 3), np.float32)})  # the budget is now automatic: 50 ms here
        one = lambda: asyncio.create_task(batcher.infer({"x": np.ones((1, 3), np.float32)}))  # noqa: E731
        session.release.clear()  # the machine stalls: the engine is stuck on the next batch
        running = one()
        await asyncio.sleep(0.01)
        waiting = [one() for _ in range(queued)]
        await asyncio.sleep(stall_s)  # the queued requests wait past the budget
        return batcher, session, [running, *waiting]

    async def scenario():
        batcher, session, short = await stall(2, 0.08)  # two rows: the next batch clears them
        batcher.admit()  # not refused: the queue does not stand
        session.release.set()
        assert all(isinstance(r, tuple) for r in await asyncio.gather(*short, return_exceptions=True))
        await batcher.close()

        # four rows queued: more than the next batch takes. (The stalled batch raises the budget to
        # 4 x its moving average, about 0.8 x the stall: still under what the queue waited.)
        batcher, session, standing = await stall(4, 0.3)
        with pytest.raises(Overloaded, match="already wait over"):
            batcher.admit()
        session.release.set()
        kinds = [type(r).__name__ for r in await asyncio.gather(*standing, return_exceptions=True)]
        assert kinds == ["tuple", "Overloaded", "Overloaded", "tuple", "tuple"]  # the oldest go, one batch is served
        await batcher.close()

    run(scenario())


def test_the_automatic_queue_budget_never_sheds_before_the_first_batch_has_run():
    async def scenario():
        session = RecordingSession(delay_s=0.2)  # a slow first batch
        batcher = Batcher([session], BatchingConfig(max_batch_size=1), metrics())
        results = await asyncio.gather(*(batcher.infer({"x": np.ones((1, 3), np.float32)}) for _ in range(2)))
        assert len(results) == 2  # the second waited 200 ms behind the first: not shed
        await batcher.close()

    run(scenario())
