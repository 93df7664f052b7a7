"""Run README.md's shell blocks verbatim, in order, on a fresh clone, the way a new user would, and say for
each command whether it failed, printed a traceback, or let a library's warning through.

    python benchmarks/readme_check.py [--sections "A first session,Microcontrollers"] [--keep]

The clone (``git clone`` of this checkout's HEAD into a temporary folder, with ``.venv`` linked to this
checkout's, so ``. .venv/bin/activate`` works as written and the code under test is the working tree's
editable install) is where every block runs. A ``leanserve serve`` line ("leave it running in another
terminal") is started in the background and waited for until ready; the block's later lines talk to it,
and it is stopped with Ctrl-C (SIGINT) when the block ends, which must exit 0. Blocks that are not shell
(``python``, ``c``) are listed as not run. Nothing here is timed or recorded: exit status 1 when any
command failed, printed a traceback or (``curl``) got an error document back, or the server's port was
taken before its block; library lines are listed for a person to judge.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHELLS = ("sh", "bash")
MARK = "@@@readme-check"
READY_TIMEOUT_S = 180
SERVER_PORT = 8000  # the README's `leanserve serve` and curl lines use the default port
# Blocks not run by default, with why: the title's `make run` serves until Ctrl-C and `make test` is the
# whole test suite (both are what `make` does, not steps of a session).
NOT_RUN = {"leanserve": "make run serves until Ctrl-C and make test runs the whole suite: run them by hand"}
# Lines that come from a library rather than from leanserve: ONNX Runtime's native log, torch's glog-style
# log, ExecuTorch's native log, Python warnings, Flower's coloured log, and the logging module's lines of
# any logger but leanserve's (as tests/cli/test_cli_library_output.py reads them).
LIBRARY_LINE = re.compile(r"\[[WE]:onnxruntime|^[WEI]\d{4} \d\d:\d\d|^\[\w+\.cpp:\d+\]|Warning:|"
                          r"^(WARNING|INFO|DEBUG) (?!leanserve)|\x1b\[\d+m(INFO|WARNING|DEBUG)")


@dataclass
class Block:
    section: str
    language: str
    commands: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    command: str
    status: int | None
    stdout: str
    stderr: str

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stdout + self.stderr

    @property
    def error_answer(self) -> bool:
        """A ``curl`` whose answer is an error document (curl -s exits 0 on a 4xx or 5xx)."""
        if not self.command.lstrip().startswith("curl"):
            return False
        try:
            answer = json.loads(self.stdout)
        except ValueError:
            return True
        return not isinstance(answer, dict) or "error" in answer

    @property
    def library_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() + self.stdout.splitlines() if LIBRARY_LINE.search(line)]


def read_blocks(readme: Path) -> list[Block]:
    """Every fenced block of ``readme`` with the heading it sits under; shell blocks split into commands
    (a line ending in a backslash continues; blank and comment-only lines are dropped)."""
    blocks, section, current = [], "", None
    pending = ""
    for line in readme.read_text().splitlines():
        if current is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        elif current is None and line.startswith("```"):
            current = Block(section, line[3:].strip())
        elif current is not None and line.startswith("```"):
            blocks.append(current)
            current = None
        elif current is not None:
            pending = f"{pending}\n{line}" if pending else line
            if line.endswith("\\"):
                continue
            if pending.strip() and not pending.strip().startswith("#"):
                current.commands.append(pending)
            pending = ""
    return blocks


def script_for(block: Block) -> str:
    """A bash script running ``block``'s commands in one shell, each between markers on both streams; a
    ``leanserve serve`` runs in the background and the script waits until it is ready."""
    lines = ["set -m",  # job control: a background server takes Ctrl-C (SIGINT) as it would from a terminal
             f"wait_ready() {{ for _ in $(seq {READY_TIMEOUT_S}); do curl -sf localhost:{SERVER_PORT}/v2/health/ready "
             ">/dev/null && return 0; sleep 1; done; echo 'server not ready' >&2; return 1; }"]
    for index, command in enumerate(block.commands):
        lines.append(f"printf '\\n{MARK} {index}\\n'; printf '\\n{MARK} {index}\\n' >&2")
        if starts_server(Block("", "", [command])):
            lines.append(f"{command.split('#')[0].strip()} > serve.log 2>&1 & echo $! > serve.pid; wait_ready")
        else:
            lines.append(command)
        lines.append(f"printf '\\n{MARK} status %d\\n' $?")
    lines.append(f"if [ -f serve.pid ]; then kill -INT $(cat serve.pid); wait $(cat serve.pid); "
                 f"printf '\\n{MARK} server %d\\n' $?; rm serve.pid; fi")
    return "\n".join(lines) + "\n"


def split_streams(block: Block, stdout: str, stderr: str) -> list[Outcome]:
    """Each command's status and output, cut out of the block's streams at the markers."""
    def pieces(text: str) -> tuple[dict[int, str], dict[int, int]]:
        output, status, index = {}, {}, None
        for line in text.splitlines(keepends=True):
            words = line.split()
            if words[:1] != [MARK]:
                if index is not None:
                    output[index] = output.get(index, "") + line
            elif words[1].isdigit():
                index = int(words[1])
            elif words[1] == "status":
                status[index] = int(words[2])
        return output, status

    (out, status), (err, _) = pieces(stdout), pieces(stderr)
    return [Outcome(command, status.get(i), out.get(i, ""), err.get(i, "")) for i, command in enumerate(block.commands)]


@dataclass
class BlockRun:
    outcomes: list[Outcome]
    server_status: int | None  # how the background server exited on Ctrl-C; None when the block started none
    server_log: str


def starts_server(block: Block) -> bool:
    return any(re.match(r"\s*leanserve serve\b", command) for command in block.commands)


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run_block(block: Block, work: Path) -> BlockRun:
    """Run one shell block in ``work``."""
    for left in ("serve.pid", "serve.log"):  # of an earlier run that was stopped half-way
        (work / left).unlink(missing_ok=True)
    # The venv's bin on PATH, as for a user who ran the first session's `. .venv/bin/activate` in this terminal.
    path = f"{work / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(["bash", "-c", script_for(block)], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PATH": path})
    log_file = work / "serve.log"
    log = log_file.read_text() if log_file.exists() else ""
    log_file.unlink(missing_ok=True)
    server = re.search(rf"^{MARK} server (\d+)$", proc.stdout, re.M)
    return BlockRun(split_streams(block, proc.stdout, proc.stderr), int(server.group(1)) if server else None, log)


def report(block: Block, run: BlockRun, show: bool) -> bool:
    """Print what each command did (all its output when ``show``); True when every command exited 0 with
    no traceback and the server, if any, stopped on Ctrl-C with status 0 and no traceback."""
    clean = True
    print(f"\n## {block.section} ({len(block.commands)} commands)")
    for outcome in run.outcomes:
        bad = outcome.status != 0 or outcome.traceback or outcome.error_answer
        clean = clean and not bad
        first = outcome.command.splitlines()[0].split("  #")[0].strip()
        verdict = "FAIL" if bad else ("LIBRARY LINES" if outcome.library_lines else "ok")
        print(f"  [{verdict}] {first}  (exit {outcome.status})")
        if bad or show:
            print(indent((outcome.stdout + outcome.stderr).strip()[-3000:]))
        for line in outcome.library_lines[:10]:
            print(f"    library: {line[:200]}")
    if run.server_status is not None:
        server_bad = run.server_status != 0 or "Traceback (most recent call last)" in run.server_log
        clean = clean and not server_bad
        print(f"  [{'FAIL' if server_bad else 'ok'}] the server stopped on Ctrl-C with status {run.server_status}")
        if server_bad:
            print(indent(run.server_log[-3000:]))
        for line in [line for line in run.server_log.splitlines() if LIBRARY_LINE.search(line)][:10]:
            print(f"    server library line: {line[:200]}")
    sys.stdout.flush()
    return clean


def indent(text: str) -> str:
    return "    " + text.replace("\n", "\n    ")


def fresh_clone(parent: Path) -> Path:
    """A clone of this checkout's HEAD with the checkout's .venv linked in."""
    work = parent / "leanserve"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(work)], check=True)
    (work / ".venv").symlink_to(ROOT / ".venv")
    return work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", help="comma-separated headings to run (default: every section with a shell block)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and print where it is")
    parser.add_argument("--work", type=Path, help="run in this folder (one a --keep run left) instead of a fresh clone")
    parser.add_argument("--show", action="store_true", help="print every command's output, not only a failure's")
    args = parser.parse_args()
    wanted = set(args.sections.split(",")) if args.sections else None
    blocks = [b for b in read_blocks(ROOT / "README.md") if (b.section in wanted if wanted else b.section not in NOT_RUN)]
    parent = None if args.work else Path(tempfile.mkdtemp(prefix="readme-check-"))
    work = args.work.resolve() if args.work else fresh_clone(parent)
    print(f"running README.md's blocks in {work}", flush=True)
    for section, why in NOT_RUN.items() if not wanted else ():
        print(f"\n## {section}: not run ({why})")
    failed = []
    for block in blocks:
        if block.language not in SHELLS:
            print(f"\n## {block.section}: a {block.language or 'plain'} block, not run")
            continue
        if starts_server(block) and port_taken(SERVER_PORT):  # its curl lines would talk to another server
            print(f"\n## {block.section}: FAIL, port {SERVER_PORT} is taken; stop what listens there and run again")
            failed.append(block.section)
            continue
        if not report(block, run_block(block, work), args.show):
            failed.append(block.section)
    print(f"\nsections with a failure: {', '.join(failed) or 'none'}")
    if parent and not args.keep:
        shutil.rmtree(parent, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
