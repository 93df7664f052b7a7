"""What every benchmark prints first and records with its figures: CPU, its int8-relevant flags, the commit
and the date; and ``record`` appends a run's figures to benchmarks/RESULTS.md, one section per run.

    from machine import print_header, record
    header = print_header("learn_bench")
    ...
    record(header, ["OGD label swap: median 0.97 over 20 reporting seeds (20/20 meet the goal)", ...])

or, for a script whose printed lines are its figures:

    with recorded("batch_bench"):
        ...print the figures...
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
_RESULTS_HEADER = """# Benchmark results

Each section is one run of one script in benchmarks/, appended by the script itself (`machine.record`):
the machine's CPU and the flags that decide int8 speed, the commit it ran on (`+dirty` when the working
tree had changes) and the date, then the figures it printed. Quality figures are held-out: measured on
rows, seeds or runs that did not choose the configuration they grade. A claim in the README or in a
docstring about accuracy, speed or rounds should point at a line here.
"""


@dataclass(frozen=True)
class Machine:
    """Where and when a benchmark ran."""

    benchmark: str
    cpu: str
    cores: int | None
    flags: tuple[str, ...]
    commit: str
    date: str

    def describe(self) -> str:
        return (f"{self.benchmark}: {self.cpu} ({self.cores} cores; flags: {', '.join(self.flags) or 'no AVX2/VNNI'}); "
                f"commit {self.commit}; {self.date}")


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + ("+dirty" if dirty else "")


def machine(benchmark: str) -> Machine:
    """The CPU (leanserve's own description, the one optimize reports print), commit and date, now."""
    from leanserve.measure import cpu_description

    cpu = cpu_description()
    return Machine(benchmark, cpu["model"], cpu["cores"], tuple(cpu["flags"]), _commit(),
                   time.strftime("%Y-%m-%d %H:%M %Z"))


def print_header(benchmark: str) -> Machine:
    """Print the one-line machine header every benchmark starts with; returns it for ``record``."""
    here = machine(benchmark)
    print(here.describe(), flush=True)
    return here


def record(here: Machine, lines: Sequence[str], path: Path = RESULTS) -> Path:
    """Append a section (benchmark, date, CPU, commit, then ``lines``) to RESULTS.md, creating it with its
    header when absent; returns the file."""
    if not path.exists():
        path.write_text(_RESULTS_HEADER, encoding="utf-8")
    section = [f"\n## {here.benchmark}, {here.date}", "",
               f"- CPU: {here.cpu} ({here.cores} cores; flags: {', '.join(here.flags) or 'no AVX2/VNNI'})",
               f"- commit: {here.commit}", "", *(f"    {line}" for line in lines), ""]
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(section))
    print(f"figures appended to {path}")
    return path


class _Tee(io.TextIOBase):
    # contextlib.redirect_stdout replaces stdout; a benchmark's figures must still reach the terminal as
    # they are printed, so this writes to both
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def recorded(benchmark: str, enabled: bool = True) -> Iterator[Machine]:
    """Print the header, then record every non-empty line printed inside the block in RESULTS.md when the
    block finishes without an exception (and ``enabled``); yields the header."""
    here = print_header(benchmark)
    captured = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, captured)):
        yield here
    if enabled:
        record(here, [line for line in captured.getvalue().splitlines() if line.strip()])


def run_recorded(benchmark: str, main):
    """Run a script's ``main()`` inside ``recorded``; a ``--no-record`` argument (taken out before the
    script's own parser sees it) skips RESULTS.md, for smoke runs. Returns what ``main`` returns."""
    enabled = "--no-record" not in sys.argv
    sys.argv = [arg for arg in sys.argv if arg != "--no-record"]
    with recorded(benchmark, enabled):
        return main()
