import json
import multiprocessing
import os

import pytest

from conftest import make_affine_model, make_static_model
from leanserve import ModelConfig, Repository, VersionPolicy
from leanserve.errors import CorruptArtifact, InvalidInput, InvalidName, ModelLoadError, ModelNotFound


def test_add_creates_numbered_immutable_versions_with_manifest(repo, affine_onnx):
    first = repo.add(affine_onnx, "affine")
    second = repo.add(affine_onnx, "affine")
    assert (first.version, second.version) == (1, 2)
    artifact = repo.get("affine", 2)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["runtime"] == "onnxruntime"
    assert manifest["signature"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in manifest["signature"]["outputs"]] == ["y", "s"]
    assert set(manifest["files"]) == {"affine.onnx"} and len(manifest["files"]["affine.onnx"]) == 64
    assert manifest["provenance"]["source"].endswith("affine.onnx") and manifest["provenance"]["created_at"]
    assert manifest["metrics"]["size_bytes"] == affine_onnx.stat().st_size


def test_models_and_versions_are_listed(affine_repo, affine_onnx):
    affine_repo.add(affine_onnx, "other")
    assert affine_repo.models() == ["affine", "other"]
    assert affine_repo.versions("affine") == [1]


def test_get_defaults_to_the_served_version_and_latest_means_newest(affine_repo, affine_onnx):
    affine_repo.add(affine_onnx, "affine")  # registered, not served
    assert affine_repo.get("affine").path.name == "1"
    assert affine_repo.get("affine", "latest").path.name == "2"


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 200, "..", "a..b", "white space"])
def test_unsafe_names_are_refused(repo, affine_onnx, name):
    with pytest.raises(InvalidName):
        repo.add(affine_onnx, name)
    assert not (repo.root.parent / "evil").exists()
    assert repo.models() == []


def test_unknown_model_and_version_raise_model_not_found(affine_repo):
    with pytest.raises(ModelNotFound, match="no model named 'missing'"):
        affine_repo.get("missing")
    with pytest.raises(ModelNotFound, match="has no version 7"):
        affine_repo.get("affine", 7)
    with pytest.raises(InvalidName):
        affine_repo.get("affine", "seven")


def test_tampered_file_fails_checksum_on_load(affine_repo):
    path = affine_repo.get("affine").model_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="checksum mismatch"):
        affine_repo.get("affine")


def test_corrupt_model_file_is_refused_and_repository_unchanged(affine_repo, tmp_path, affine_onnx):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(affine_onnx.read_bytes()[: affine_onnx.stat().st_size // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(300))
    for bad in (truncated, garbage):
        with pytest.raises(ModelLoadError):
            affine_repo.add(bad, "affine")
    assert affine_repo.versions("affine") == [1]
    staging = affine_repo.root / "affine" / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_remove_deletes_only_that_version(affine_repo, affine_onnx):
    affine_repo.add(affine_onnx, "affine")
    affine_repo.remove("affine", 1)
    assert affine_repo.versions("affine") == [2]
    with pytest.raises(ModelNotFound):
        affine_repo.remove("affine", 1)


def test_half_written_version_folder_is_invisible(affine_repo):
    (affine_repo.root / "affine" / "5").mkdir()  # e.g. a crash left a folder without a manifest
    assert affine_repo.versions("affine") == [1]


def test_junk_in_repository_is_ignored(affine_repo):
    (affine_repo.root / "notes.txt").write_text("hello")
    (affine_repo.root / ".cache").mkdir()
    (affine_repo.root / "affine" / "junk").mkdir()
    assert affine_repo.models() == ["affine"]
    assert affine_repo.versions("affine") == [1]


def test_next_version_number_never_reuses_a_removed_one_while_present(affine_repo, affine_onnx):
    affine_repo.add(affine_onnx, "affine")
    affine_repo.remove("affine", 1)
    assert affine_repo.add(affine_onnx, "affine").version == 3


def _add_in_process(args):
    root, model = args
    return Repository(root).add(model, "race").version


def test_concurrent_adds_from_processes_get_distinct_versions(repo, affine_onnx):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        versions = pool.map(_add_in_process, [(str(repo.root), str(affine_onnx))] * 4)
    assert sorted(versions) == [1, 2, 3, 4]
    assert repo.versions("race") == [1, 2, 3, 4]


def test_config_round_trips_and_rejects_unknown_keys(affine_repo):
    config = ModelConfig(version_policy=VersionPolicy(kind="all"))
    affine_repo.set_config("affine", config)
    assert affine_repo.config("affine").version_policy.kind == "all"
    (affine_repo.root / "affine" / "config.json").write_text(json.dumps({"batching": {"max_batchsize": 3}}))
    with pytest.raises(InvalidInput, match="unknown setting 'max_batchsize'"):
        affine_repo.config("affine")


def test_version_policy_selects_versions():
    assert VersionPolicy().select([1, 2, 3]) == [3]
    assert VersionPolicy(kind="latest", n=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy(kind="all").select([2, 1]) == [1, 2]
    assert VersionPolicy(kind="specific", versions=(1, 5)).select([1, 2, 3]) == [1]
    with pytest.raises(InvalidInput):
        VersionPolicy(kind="newest")


def test_static_model_imports_with_its_fixed_shape(repo, tmp_path):
    ref = repo.add(make_static_model(tmp_path / "static.onnx"), "static")
    assert repo.get(ref.name).signature.inputs[0].shape == (2, 3)


def test_repository_path_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(InvalidInput, match="is a file"):
        Repository(file)


def test_onnx_with_external_data_copies_its_data_file(repo, tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    src = tmp_path / "ext"
    src.mkdir()
    onnx.save(model, str(src / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    ref = repo.add(src / "ext.onnx", "ext")
    assert set(repo.get(ref.name).manifest.files) == {"ext.onnx", "ext.data"}
    (src / "ext.data").unlink()
    with pytest.raises(ModelLoadError, match="external data file 'ext.data' is missing"):
        repo.add(src / "ext.onnx", "ext")

