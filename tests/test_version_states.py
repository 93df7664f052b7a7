"""A version's lifecycle as a user meets it from the command line and the repository: registering is not
deploying, numbers are never reused, commands act on the served version, versions are ASCII digits."""

import json

import numpy as np
import pytest

from leanserve.artifact import Provenance
from leanserve.cli import main
from leanserve.config import LifecycleConfig
from leanserve.errors import InvalidInput, InvalidName
from leanserve.repository import Repository, parse_version


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_first_import_serves_and_later_imports_are_only_registered(capsys, tmp_path, affine_onnx):
    repo = tmp_path / "repo"
    code, out, _ = run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo)
    assert code == 0 and "affine:1" in out and "takes all traffic" in out
    code, out, _ = run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo)
    assert code == 0 and "registered, not served" in out and "leanserve promote affine:2" in out
    code, out, _ = run(capsys, "list", "--repo", repo)
    assert "v1      serving" in out and "v2      registered" in out


def test_promote_serves_a_version_and_rollback_returns_to_the_one_before(capsys, tmp_path, affine_onnx):
    repo = tmp_path / "repo"
    for _ in range(2):
        run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo)
    code, out, _ = run(capsys, "promote", "affine:2", "--repo", repo)
    assert code == 0 and "affine:2 now takes all traffic (before: affine:1)" in out
    assert Repository(repo).state("affine") == {1: "retired", 2: "serving"}
    assert run(capsys, "rollback", "affine", "--repo", repo)[0] == 0
    assert Repository(repo).state("affine") == {1: "serving", 2: "retired"}


def test_import_with_serve_takes_all_traffic_at_once(capsys, tmp_path, affine_onnx):
    repo = tmp_path / "repo"
    run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo)
    code, out, _ = run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo, "--serve")
    assert code == 0 and "takes all traffic" in out
    assert Repository(repo).serving("affine").version == 2


def test_the_import_policy_is_a_model_setting(repo, affine_onnx):
    repo.add(affine_onnx, "affine")
    repo.update_config("affine", lifecycle=LifecycleConfig(on_import="serve"))
    assert repo.add(affine_onnx, "affine").version == repo.serving("affine").version == 2
    assert repo.add(affine_onnx, "affine", serve=False).version == 3 and repo.serving("affine").version == 2
    with pytest.raises(InvalidInput, match="lifecycle.on_import: expected serve or register, got 'always'"):
        LifecycleConfig(on_import="always")


def test_derived_versions_are_registered_even_when_imports_serve(repo, affine_onnx):
    repo.add(affine_onnx, "affine")
    repo.update_config("affine", lifecycle=LifecycleConfig(on_import="serve"))
    ref = repo.add(affine_onnx, "affine", provenance=Provenance(parent="affine:1"), serve=False)
    assert repo.state("affine") == {1: "serving", ref.version: "registered"}


def test_a_model_without_traffic_settings_serves_its_newest_original_version(repo, affine_onnx):
    """Repositories written before traffic settings (or folders copied in by hand) keep serving, but a
    derived version does not take over by being newest."""
    repo.add(affine_onnx, "affine")
    repo.add(affine_onnx, "affine", serve=True)
    repo.add(affine_onnx, "affine", provenance=Provenance(parent="affine:2"), serve=True)
    config = repo.config("affine")
    repo.set_config("affine", config.replace(traffic=config.traffic.__class__()))  # no traffic settings at all
    assert repo.serving("affine").version == 2
    assert repo.state("affine")[3] == "registered"


def test_version_numbers_are_never_reused_after_the_newest_is_removed(repo, affine_onnx):
    repo.add(affine_onnx, "affine")
    repo.add(affine_onnx, "affine")
    repo.remove("affine", 2)
    assert repo.add(affine_onnx, "affine").version == 3
    assert (repo.root / "affine" / ".last-version").read_text() == "3"


@pytest.mark.parametrize("text", ["²", "٣", "1²", "+1", "0", "-2", "1.0", ""])
def test_only_ascii_digits_are_version_numbers(text):
    with pytest.raises(InvalidName, match="ASCII digits"):
        parse_version(text)


def test_odd_folders_are_not_versions(repo, affine_onnx):
    repo.add(affine_onnx, "affine")
    (repo.root / "affine" / "²").mkdir()
    (repo.root / "affine" / "²" / "manifest.json").write_text("{}")
    assert repo.versions("affine") == [1]
    assert repo.add(affine_onnx, "affine").version == 2


def test_cli_refuses_a_unicode_version_in_one_line(capsys, tmp_path, affine_onnx):
    repo = tmp_path / "repo"
    run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo)
    code, _, err = run(capsys, "inspect", "affine:²", "--repo", repo)
    assert code == 1 and err.startswith("error: invalid version '²'") and "Traceback" not in err
    code, _, err = run(capsys, "traffic", "affine", "--weights", "1=²", "--repo", repo)
    assert code == 1 and "expected VERSION=WEIGHT" in err
    code, _, err = run(capsys, "promote", "affine:²", "--repo", repo)
    assert code == 1 and "invalid version" in err


def test_commands_default_to_the_served_version_and_say_which(capsys, tmp_path, affine_onnx):
    repo = tmp_path / "repo"
    run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo)
    run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo)  # registered, not served
    request = tmp_path / "x.npy"
    np.save(request, np.ones((1, 4), np.float32))
    code, out, err = run(capsys, "predict", "affine", "--input", request, "--repo", repo)
    assert code == 0 and "using affine:1, the version serving most traffic" in err
    assert json.loads(out)["y"]["data"] == [[3.0] * 4]
    code, out, err = run(capsys, "predict", "affine:2", "--input", request, "--repo", repo)
    assert code == 0 and "using" not in err
    code, out, _ = run(capsys, "inspect", "affine", "--repo", repo)
    assert out.startswith("affine:1 ")
