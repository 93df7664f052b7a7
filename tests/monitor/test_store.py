import os
import signal
import sqlite3

import numpy as np
import pytest

from conftest import wait_until
from leanserve.errors import InvalidInput
from leanserve.monitor.packing import stack
from leanserve.monitor.store import LogConfig, PredictionLog


@pytest.fixture
def plog(tmp_path):
    log = PredictionLog(LogConfig(tmp_path / "log.db", flush_interval_s=0.02))
    yield log
    log.close()


def sample(i):
    return {"x": np.full((1, 3), i, np.float32)}, {"y": np.array([[i % 3, 1, 0]], np.float32)}


def test_samples_are_written_off_the_calling_thread_and_read_back(plog):
    for i in range(50):
        inputs, outputs = sample(i)
        assert plog.record("m", 1 + i % 2, f"r{i}", inputs, outputs, latency_ms=0.5, group="a" if i % 2 else "b")
    plog.flush()
    assert plog.stats.written == 50 and plog.count("m") == 50
    rows = plog.rows("m", version=2)
    assert [r["request_id"] for r in rows][:2] == ["r1", "r3"] and rows[0]["group"] == "a"
    assert stack(rows, "inputs")["x"].shape == (25, 3)


def test_feedback_joins_labels_by_request_id_and_refuses_unknown_and_duplicates(plog):
    for i in range(5):
        plog.record("m", 1, f"r{i}", *sample(i), latency_ms=1.0)
    plog.flush()
    result = plog.feedback("m", [("r0", 0), ("r1", 1), ("nope", 2)])
    assert result.accepted == 2 and result.unknown == ["nope"]
    assert plog.feedback("m", [("r0", 1)]).duplicate == ["r0"]
    labelled = plog.rows("m", labelled=True)
    assert [(r["request_id"], int(r["label"])) for r in labelled] == [("r0", 0), ("r1", 1)]


def test_sampling_rate_keeps_about_that_share(tmp_path):
    log = PredictionLog(LogConfig(tmp_path / "s.db", sample_rate=0.2))
    kept = sum(log.record("m", 1, str(i), *sample(i), latency_ms=1.0) for i in range(2000))
    log.close()
    assert 300 < kept < 500


def test_retention_drops_whole_segments_and_keeps_the_newest_samples_in_order(tmp_path):
    log = PredictionLog(LogConfig(tmp_path / "r.db", max_rows=100, flush_interval_s=0.02))
    for i in range(400):
        log.record("m", 1, str(i), *sample(i), latency_ms=1.0)
    log.flush()
    assert log.feedback("m", [("399", 1), ("300", 0)]).accepted == 2  # ids found in the newest and an older segment
    assert log.feedback("m", [("10", 1)]).unknown == ["10"]  # retention dropped it
    log.close()
    assert 100 <= log.count() < 100 + 13  # frames of 64 split where a segment (100 / 8 rows) fills up
    files = sorted(p.name for p in (tmp_path / "r.db").iterdir())
    assert len([f for f in files if f.endswith(".db")]) == 8 and len([f for f in files if f.endswith(".bin")]) == 8
    ids = [int(r["request_id"]) for r in log.rows("m", limit=1000)]
    assert ids == list(range(400 - len(ids), 400))
    assert [int(r["inputs"]["x"][0, 0]) for r in log.rows("m", limit=3)] == [397, 398, 399]


def test_a_log_reopened_continues_its_newest_segment(tmp_path):
    for start in (0, 5):
        log = PredictionLog(LogConfig(tmp_path / "o.db", flush_interval_s=0.02))
        for i in range(start, start + 5):
            log.record("m", 1, str(i), *sample(i), latency_ms=1.0)
        log.close()
    assert [r["request_id"] for r in log.rows("m")] == [str(i) for i in range(10)]
    assert len(list((tmp_path / "o.db").glob("seg-*.db"))) == 1


def test_a_single_file_log_of_an_older_version_is_refused_untouched(tmp_path):
    (tmp_path / "old.db").write_bytes(b"SQLite format 3\x00")
    with pytest.raises(InvalidInput, match="older leanserve.*move the file away"):
        PredictionLog(LogConfig(tmp_path / "old.db"))
    assert (tmp_path / "old.db").read_bytes() == b"SQLite format 3\x00"


def test_a_stuck_writer_costs_samples_beyond_queue_size_never_a_blocked_caller(tmp_path):
    log = PredictionLog(LogConfig(tmp_path / "q.db", queue_size=5, flush_interval_s=0.02))
    os.kill(log._process.pid, signal.SIGSTOP)  # the writer takes nothing more
    try:
        results = [log.record("m", 1, str(i), *sample(i), latency_ms=1.0) for i in range(20)]
        assert results.count(True) == 5 and log.stats.dropped == 15
    finally:
        os.kill(log._process.pid, signal.SIGCONT)
    log.flush()
    assert log.count("m") == 5
    log.close()


def test_a_locked_database_loses_samples_but_never_raises(tmp_path):
    log = PredictionLog(LogConfig(tmp_path / "l.db", flush_interval_s=0.02))
    blocker = sqlite3.connect(tmp_path / "l.db" / "seg-00000001.db")
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(10):
            assert log.record("m", 1, str(i), *sample(i), latency_ms=1.0)
        wait_until(lambda: log.stats.failed > 0, timeout_s=10, what="the writer to give up on the locked database")
    finally:
        blocker.rollback()
        blocker.close()
    log.flush()
    log.close()
    assert log.stats.failed + log.stats.written == 10 and log.stats.failed > 0


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(InvalidInput, match="sample_rate"):
        LogConfig(tmp_path / "x.db", sample_rate=1.5)


def test_pack_round_trips_every_kind_of_array():
    from leanserve.monitor.packing import pack, unpack

    arrays = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.array([1, -2], np.int64),
              "b": np.array([b"ab", b"c"], dtype=object), "empty": np.zeros((0, 4), np.float16), "s": np.float64(2.5)}
    back = unpack(pack({k: np.asarray(v) for k, v in arrays.items()}))
    for name, array in arrays.items():
        expected = np.asarray(array).astype(bytes) if np.asarray(array).dtype == object else np.asarray(array)
        np.testing.assert_array_equal(back[name], expected)
        assert back[name].dtype == expected.dtype and back[name].shape == expected.shape


def test_a_killed_writer_process_costs_samples_and_a_new_one_takes_over(tmp_path):
    log = PredictionLog(LogConfig(tmp_path / "k.db", flush_interval_s=0.02))
    try:
        log.record("m", 1, "before", *sample(0), latency_ms=1.0)
        log.flush()
        first = log._process
        first.kill()
        first.wait()
        log.record("m", 1, "lost", *sample(1), latency_ms=1.0)  # the batch that finds the writer dead
        wait_until(lambda: log._process is not first, timeout_s=10, what="a new writer process")
        log.record("m", 1, "after", *sample(1), latency_ms=1.0)
        log.flush()
        assert log.stats.failed >= 1 and "writer process ended" in log.stats.last_error
        ids = [r["request_id"] for r in log.rows("m")]
        assert ids[0] == "before" and ids[-1] == "after"
        assert ids == ["before", "after"] and (log.stats.written, log.stats.failed) == (2, 1)
    finally:
        log.close()


def test_the_writer_process_ends_when_the_log_closes(tmp_path):
    log = PredictionLog(LogConfig(tmp_path / "c.db", flush_interval_s=0.02))
    log.record("m", 1, "r", *sample(0), latency_ms=1.0)
    log.close()
    assert log._process.poll() is not None and log.count("m") == 1


def test_frames_larger_than_the_pipe_wait_and_arrive_whole(tmp_path):
    log = PredictionLog(LogConfig(tmp_path / "big.db", flush_interval_s=0.02))
    big = {"x": np.arange(100_000, dtype=np.float32)[None]}  # 400 kB a sample: the pipe holds two or three
    os.kill(log._process.pid, signal.SIGSTOP)
    try:
        for i in range(12):
            assert log.record("m", 1, str(i), big, {"y": np.array([[i]], np.float32)}, latency_ms=1.0)
        log.flush(timeout_s=0.3)
        assert len(log._pending) > 0  # partly written frames wait in the log, not in the caller
    finally:
        os.kill(log._process.pid, signal.SIGCONT)
    log.flush()
    rows = log.rows("m", limit=20)
    assert [int(r["outputs"]["y"][0, 0]) for r in rows] == list(range(12))
    assert all(np.array_equal(r["inputs"]["x"], big["x"]) for r in rows)
    log.close()


def test_a_read_only_log_starts_no_writer_and_refuses_samples(plog, tmp_path):
    plog.record("m", 1, "r", *sample(0), latency_ms=1.0)
    plog.flush()
    reader = PredictionLog(plog.config, read_only=True)
    assert reader._process is None and reader.count("m") == 1 and reader.rows("m")[0]["request_id"] == "r"
    with pytest.raises(RuntimeError, match="read-only"):
        reader.record("m", 1, "x", *sample(1), latency_ms=1.0)
    reader.close()


def test_feedback_right_after_record_is_joined_whatever_the_flush_state(tmp_path):
    plog = PredictionLog(LogConfig(tmp_path / "log", flush_interval_s=60))  # nothing framed by the timer
    try:
        for i in range(10):  # fewer than a frame: all still in the server's memory
            plog.record("m", 1, f"r{i}", {"x": np.zeros((1, 2), np.float32)}, {"y": np.eye(3, dtype=np.float32)[i % 3][None]}, 1.0)
        result = plog.feedback("m", [(f"r{i}", i % 3) for i in range(10)] + [("ghost", 0)])
        assert result.accepted == 10 and result.unknown == ["ghost"] and plog.stats.waits_for_writer == 1
        assert [int(j.output.argmax()) for j in result.joined] == [j.label for j in result.joined]
    finally:
        plog.close()
