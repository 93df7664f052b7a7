"""Every user error the CLI meets in real runs is one line on stderr and a non-zero exit, never a traceback."""

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import free_port, wait_until

from leanserve.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(err: str) -> None:
    assert "Traceback" not in err and err.startswith("error") and err.count("\n") == 1, err


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "leanserve.cli", *map(str, argv)]


@pytest.fixture
def broken_npz(tmp_path):
    path = tmp_path / "broken.npz"
    np.savez(path, x=np.ones((8, 4), np.float32))
    path.write_bytes(path.read_bytes()[:40])  # cut short, as an interrupted copy leaves it
    return path


def test_predict_refuses_a_broken_npz_in_one_line(capsys, affine_repo, broken_npz):
    code, _, err = run(capsys, "predict", "affine:1", "--input", broken_npz, "--repo", affine_repo.root)
    assert code == 1 and "unreadable input file" in err
    assert_one_line(err)


def test_optimize_refuses_a_broken_npz_in_one_line(capsys, affine_repo, broken_npz):
    code, _, err = run(capsys, "optimize", "affine:1", "--eval", broken_npz, "--repo", affine_repo.root)
    assert code == 1 and "not a readable .npz file" in err
    assert_one_line(err)


def test_predict_checks_the_output_folder_before_loading_the_model(capsys, affine_repo, tmp_path):
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    # the model does not exist either: the output folder is what is said, so nothing ran before the check
    code, _, err = run(capsys, "predict", "nope", "--input", tmp_path / "x.npz", "--output", tmp_path / "missing" / "y.npz",
                       "--repo", affine_repo.root)
    assert code == 1 and "no folder" in err and "missing" in err
    assert_one_line(err)


def test_predict_refuses_an_unknown_output_suffix_before_running(capsys, affine_repo, tmp_path):
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    code, _, err = run(capsys, "predict", "affine", "--input", tmp_path / "x.npz", "--output", tmp_path / "y.txt",
                       "--repo", affine_repo.root)
    assert code == 1 and "output files must be" in err
    assert not (tmp_path / "y.txt").exists()


@pytest.mark.parametrize("which", ["--port", "--grpc-port"])
def test_serve_names_the_port_that_is_taken_and_starts_nothing(affine_repo, which):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"--port": free_port(), "--grpc-port": free_port(), which: taken}
        result = subprocess.run(cli("serve", affine_repo.root, "--port", ports["--port"], "--grpc-port",
                                    ports["--grpc-port"], "--no-monitor"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"127.0.0.1:{taken} is not free" in result.stderr and which in result.stderr
    assert ("HTTP" if which == "--port" else "gRPC") in result.stderr
    assert "serving" not in result.stdout + result.stderr and "Traceback" not in result.stderr


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_serve_exits_quietly_on_ctrl_c(affine_repo):
    port = free_port()
    server = subprocess.Popen(cli("serve", affine_repo.root, "--port", port, "--grpc-port", free_port()),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: listening(port), timeout_s=60, what="serve listening")
        # at once: the prediction log's writer and the monitor's worker may still be starting (importing)
        os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group gets it
        _, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert server.returncode in (0, 130)


def test_a_reader_that_leaves_early_is_no_error(affine_repo):
    reader = subprocess.Popen(cli("inspect", "affine", "--repo", affine_repo.root), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    reader.stdout.close()  # `| head` gone before the first line
    err = reader.stderr.read()
    reader.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_import_with_unusable_data_imports_nothing(capsys, tmp_path, affine_onnx):
    from leanserve import Repository

    np.savez(tmp_path / "wrong.npz", y=np.zeros((10, 4), np.float32))
    code, _, err = run(capsys, "import", affine_onnx, "--name", "affine", "--repo", tmp_path / "repo",
                       "--data", tmp_path / "wrong.npz")
    assert code == 1 and "has no array for input 'x'" in err
    assert_one_line(err)
    assert Repository(tmp_path / "repo").models() == []


def test_import_with_a_broken_npz_imports_nothing(capsys, tmp_path, affine_onnx, broken_npz):
    from leanserve import Repository

    code, _, err = run(capsys, "import", affine_onnx, "--name", "affine", "--repo", tmp_path / "repo",
                       "--data", broken_npz)
    assert code == 1 and "not a readable .npz file" in err
    assert Repository(tmp_path / "repo").models() == []


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["federate", "m", "--rounds", "0"],
                                  ["federate", "m", "--local-epochs", "-1"], ["optimize", "m", "--eval", "e.npz",
                                                                              "--holdout-fraction", "1.5"]])
def test_counts_below_one_are_refused_in_one_line(capsys, tmp_path, argv):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--repo", str(tmp_path / "repo")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "must be" in err
    assert_one_line(err)
    assert not (tmp_path / "repo").exists()


def test_demo_api_refuses_zero_epochs(tmp_path):
    from leanserve.demo import run_demo
    from leanserve.errors import InvalidInput
    from leanserve.repository import Repository

    with pytest.raises(InvalidInput, match="at least 1"):
        run_demo(Repository(tmp_path / "repo"), epochs=0)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "leanserve inspect" in err and "--help" in err
    assert_one_line(err)


def test_library_warnings_are_quiet_unless_verbose(capsys, affine_repo, tmp_path):
    import warnings

    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    assert main(["predict", "affine", "--input", str(tmp_path / "x.npz"), "--repo", str(affine_repo.root)]) == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("a library's note", UserWarning)  # what torch or Flower would say mid-command
    assert seen == []
