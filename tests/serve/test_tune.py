"""The batching tuner: real ``leanserve serve`` subprocesses on loopback, driven by wrk or the in-process client."""

from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path

import pytest

from leanserve.cli import main
from leanserve.config import BatchingConfig, RuntimeOptions
from leanserve.errors import InvalidInput
from leanserve.serve.candidates import (MAX_CANDIDATES, Candidate, default_grid, parse_concurrency, parse_grid,
                                        with_current)
from leanserve.serve.tune import TuneError, TuneOptions, tune

# Every request waits up to a second for more rows, so this setting's p99 is over any bound below 1 s.
SLOW = BatchingConfig(max_batch_size=32, max_queue_delay_us=1_000_000)


def _tune(repo, *extra: str) -> int:
    return main(["tune", "affine", "--repo", str(repo.root), "--seconds", "1", *extra])


def _children() -> set[int]:
    """Live child processes of this test process (Linux)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids |= {int(p) for p in (task / "children").read_text().split()}
    return {p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]}


def test_tune_writes_the_fastest_setting_within_the_bound_and_plots_it(affine_repo, tmp_path, capsys):
    affine_repo.update_config("affine", batching=SLOW, runtime=RuntimeOptions(inter_op_threads=1))
    plot = tmp_path / "plot.png"

    status = _tune(affine_repo, "--p99-ms", "500", "--concurrency", "1,4",
                   "--grid", "max_batch_size=off,8;max_queue_delay_us=200;intra_op_threads=1", "--plot", str(plot))

    out = capsys.readouterr().out
    assert status == 0
    assert "load from wrk" in out or "asyncio/httpx" in out
    chosen = re.search(r"^\* (\S+)\s+(\d+)\s+(\S+)\s+(\d+)", out, re.M)
    assert chosen, out
    config = affine_repo.config("affine")
    assert Candidate.of(config).batch == chosen.group(1) != "32@1000000us"
    assert (config.batching.instances, config.runtime.intra_op_threads) == (1, 1)
    assert config.runtime.inter_op_threads == 1  # settings the tuner does not try stay as they were
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_an_impossible_bound_exits_nonzero_and_leaves_the_config_alone(affine_repo, tmp_path, capsys):
    affine_repo.update_config("affine", batching=BatchingConfig(max_batch_size=16))
    config_file = affine_repo.root / "affine" / "config.json"
    before = config_file.read_bytes()

    status = _tune(affine_repo, "--p99-ms", "0.001", "--concurrency", "2", "--grid", "max_batch_size=off",
                   "--load", "python", "--plot", str(tmp_path / "plot.png"))

    out = capsys.readouterr().out
    assert status == 1
    assert "no setting keeps p99 <= 0.001 ms" in out
    assert "asyncio/httpx" in out  # says which load generator measured
    rows = [line for line in out.splitlines() if line.startswith("- ")]
    assert len(rows) == 2 and all(int(row.split()[5]) > 0 for row in rows)  # both measured, both over the bound
    assert config_file.read_bytes() == before
    assert (tmp_path / "plot.png").is_file()


def test_an_interrupted_run_stops_its_server_and_changes_nothing(affine_repo, tmp_path, monkeypatch):
    affine_repo.update_config("affine", batching=BatchingConfig(max_batch_size=16))
    config_file = affine_repo.root / "affine" / "config.json"
    before = config_file.read_bytes()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    children_before = _children()

    def ctrl_c(measurement) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(affine_repo, "affine", TuneOptions(p99_ms=1000, concurrency=(1,), seconds=1, warmup_s=0),
             [Candidate(None, instances=1)], on_measurement=ctrl_c)

    assert config_file.read_bytes() == before
    assert not list(tmp_path.glob("leanserve-tune-*"))  # the scratch repository is gone
    assert _children() <= children_before  # and so is the server


def test_a_server_that_dies_midway_fails_the_run_with_its_log_and_changes_nothing(affine_repo, tmp_path, monkeypatch):
    affine_repo.update_config("affine", batching=BatchingConfig(max_batch_size=16))
    config_file = affine_repo.root / "affine" / "config.json"
    before = config_file.read_bytes()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    children_before = _children()

    def kill_server(measurement) -> None:
        for pid in _children() - children_before:
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(TuneError, match=r"the tuning server exited \(status -9\); its log:\n.*serving"):
        tune(affine_repo, "affine", TuneOptions(p99_ms=1000, concurrency=(1,), seconds=1, warmup_s=0),
             [Candidate(None, instances=1)], on_measurement=kill_server)

    assert config_file.read_bytes() == before
    assert not list(tmp_path.glob("leanserve-tune-*"))


@pytest.mark.parametrize("grid, message", [
    ("batch=8", "KEY one of max_batch_size"),
    ("max_batch_size=8,big", "'big' is not a whole number or 'off'"),
    ("instances=0", "--grid: instances must be an integer >= 1"),
    ("max_batch_size=1,2,3,4,5,6,7;instances=1,2,3,4;intra_op_threads=1,2", f"at most {MAX_CANDIDATES}"),
])
def test_a_bad_grid_is_refused_before_anything_runs(affine_repo, capsys, grid, message):
    assert _tune(affine_repo, "--p99-ms", "10", "--grid", grid) == 1
    assert message in capsys.readouterr().err


def test_an_unknown_model_is_refused_by_name(affine_repo, capsys):
    assert main(["tune", "nope", "--repo", str(affine_repo.root), "--p99-ms", "10"]) == 1
    assert "no model named 'nope'" in capsys.readouterr().err


def test_grid_is_the_product_of_its_values_and_keeps_unset_keys_from_the_current_setting():
    current = Candidate(32, 200, instances=2, intra_op_threads=4)

    grid = parse_grid("max_batch_size=off,8;max_queue_delay_us=100,1000", current)

    assert grid == (Candidate(None, 0, 2, 4), Candidate(8, 100, 2, 4), Candidate(8, 1000, 2, 4))  # off has no delay


def test_every_run_measures_the_current_setting_first_and_once():
    current = default_grid()[3]
    assert with_current(default_grid(), current) == (current, *(c for c in default_grid() if c != current))


def test_the_default_grid_is_small_and_covers_each_knob():
    grid = default_grid()
    assert 8 <= len(grid) <= 12 and len(set(grid)) == len(grid)
    assert {c.max_batch_size for c in grid} == {None, 8, 32}
    assert {c.max_queue_delay_us for c in grid if c.max_batch_size} == {200, 1000}
    assert {c.instances for c in grid} == {1, 2} and {c.intra_op_threads for c in grid} == {1, 2}


def test_a_candidate_changes_only_batching_instances_and_threads(affine_repo):
    config = affine_repo.update_config("affine", batching=BatchingConfig(preferred_batch_sizes=(4, 16), timeout_ms=500),
                                       runtime=RuntimeOptions(inter_op_threads=3))

    tuned = Candidate(8, 1000, instances=2, intra_op_threads=1).apply(config)

    assert tuned.batching == BatchingConfig(max_batch_size=8, max_queue_delay_us=1000, instances=2,
                                            preferred_batch_sizes=(4,), timeout_ms=500)
    assert tuned.runtime == RuntimeOptions(intra_op_threads=1, inter_op_threads=3)
    assert Candidate(None, instances=1).apply(config).batching.enabled is False


def test_concurrency_and_bound_are_checked():
    assert parse_concurrency("32,1,8,8") == (1, 8, 32)
    with pytest.raises(InvalidInput, match="whole numbers >= 1"):
        parse_concurrency("0,4")
    with pytest.raises(InvalidInput, match="above 0"):
        TuneOptions(p99_ms=0)
