"""Token-budget batching (batching.max_batch_tokens) and the session's admit() check before queueing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from leanserve.artifact import Signature, TensorSpec
from leanserve.config import BatchingConfig
from leanserve.errors import InvalidInput
from leanserve.serve.batching import Batcher
from leanserve.serve.metrics import ServerMetrics


class TextLike:
    """A BYTES-in session whose admit() says each request's length (its text's byte count) and refuses
    empty texts; it records the batches it runs (rows, longest)."""

    engine = "fake"
    signature = Signature((TensorSpec("text", "BYTES", (-1,)),), (TensorSpec("n", "INT64", (-1,)),))

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.lengths: list[list[int]] = []
        self.texts: list[list[bytes]] = []

    def admit(self, inputs):
        lengths = [len(t) for t in inputs["text"]]
        if min(lengths) == 0:
            raise InvalidInput("empty text")
        return max(lengths)

    def run(self, inputs, outputs=None):
        texts = inputs["text"]
        self.batches.append((len(texts), max(len(t) for t in texts)))
        self.lengths.append([len(t) for t in texts])
        self.texts.append([bytes(t) for t in texts])
        return {"n": np.array([len(t) for t in texts], dtype=np.int64)}

    def close(self) -> None:
        pass


async def _send_all(config: BatchingConfig, texts: list[bytes]) -> TextLike:
    session = TextLike()
    batcher = Batcher([session], config, ServerMetrics().for_version("m", 1))
    # the one instance is busy with the first request while the rest queue up behind it
    answers = await asyncio.gather(*(batcher.infer({"text": np.array([t], dtype=object)}) for t in texts))
    assert [int(a[0]["n"][0]) for a in answers] == [len(t) for t in texts]
    await batcher.close()
    return session


def test_a_token_budget_keeps_a_long_text_from_padding_the_short_ones():
    texts = [b"x" * 5] * 8 + [b"y" * 60] + [b"z" * 5] * 8
    config = BatchingConfig(max_batch_size=32, max_queue_delay_us=20_000)
    without = asyncio.run(_send_all(config, texts))
    budget = asyncio.run(_send_all(BatchingConfig(max_batch_size=32, max_queue_delay_us=20_000, max_batch_tokens=64), texts))
    assert all(rows * longest <= 64 or rows == 1 for rows, longest in budget.batches)
    padded = lambda batches: sum(rows * longest for rows, longest in batches)  # noqa: E731
    assert padded(budget.batches) < padded(without.batches)


def test_a_token_budget_groups_queued_texts_of_similar_length_oldest_first():
    texts = [bytes([97 + i]) * (60 if i % 2 else 5) for i in range(17)]  # short, long, short, long...
    session = asyncio.run(_send_all(BatchingConfig(max_batch_size=32, max_queue_delay_us=20_000, max_batch_tokens=240), texts))
    assert all(len(set(lengths)) == 1 for lengths in session.lengths), session.lengths  # no short text padded to 60
    assert sorted(sum(session.texts, [])) == sorted(texts)
    left = list(texts)
    for batch in session.texts:  # each batch is led by the oldest request still waiting
        assert batch[0] == left[0], (batch, left)
        left = [t for t in left if t not in batch]


def test_admit_refuses_one_request_before_it_is_queued():
    async def scenario():
        session = TextLike()
        batcher = Batcher([session], BatchingConfig(), ServerMetrics().for_version("m", 1))
        with pytest.raises(InvalidInput, match="empty text"):
            await batcher.infer({"text": np.array([b""], dtype=object)})
        ok, _ = await batcher.infer({"text": np.array([b"abc"], dtype=object)})
        await batcher.close()
        return session, ok

    session, ok = asyncio.run(scenario())
    assert int(ok["n"][0]) == 3 and session.batches == [(1, 3)]


def test_max_batch_tokens_must_be_a_count():
    with pytest.raises(InvalidInput, match="batching.max_batch_tokens: expected an integer >= 0"):
        BatchingConfig(max_batch_tokens=-1)
