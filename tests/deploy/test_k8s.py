"""``leanserve k8s``: a Dockerfile and KServe manifests, read back and checked field by field."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import leanserve
import leanserve.deploy
from leanserve.deploy import bundle as bundle_module

yaml = pytest.importorskip("yaml")
k8s = pytest.importorskip("leanserve.deploy.k8s")

from leanserve.cli import build_parser, main  # noqa: E402
from leanserve.config import RuntimeOptions  # noqa: E402
from leanserve.errors import InvalidInput  # noqa: E402

IMAGE = "ghcr.io/acme/leanserve:0.1.0"
ROOT = Path(__file__).resolve().parents[2]


def run_k8s(repo, out, *extra) -> int:
    return main(["k8s", str(repo), "--image", IMAGE, "--out", str(out), *extra])


def load(out: Path, name: str) -> dict:
    return yaml.safe_load((out / name).read_text())


def container(out: Path) -> dict:
    (only,) = load(out, "clusterservingruntime.yaml")["spec"]["containers"]
    return only


@pytest.fixture
def bundle(affine_repo, tmp_path) -> Path:
    out = tmp_path / "k8s"
    assert run_k8s(affine_repo.root, out) == 0
    return out


def test_the_runtime_runs_leanserve_as_a_kserve_v2_server(bundle):
    runtime = load(bundle, "clusterservingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ClusterServingRuntime"
    assert runtime["metadata"]["name"] == "leanserve"
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    server = container(bundle)
    assert server["name"] == "kserve-container" and server["image"] == IMAGE
    assert server["command"] == ["leanserve"] and server["args"][:2] == ["serve", "/mnt/models"]
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"http": 8080, "grpc": 8081}
    assert {"name": "ORT_DISABLE_TELEMETRY", "value": "1"} in server["env"]


def test_the_runtime_arguments_are_ones_the_serve_command_accepts(bundle):
    server = container(bundle)
    args = build_parser().parse_args(server["args"])
    assert (args.repo_path, args.host, args.port, args.grpc_port) == ("/mnt/models", "0.0.0.0", 8080, 8081)
    assert not args.no_monitor  # the repository is in the image, so the prediction log can be written


def test_probes_use_the_v2_health_routes_on_the_http_port(bundle):
    server = container(bundle)
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_pods_are_scraped_by_prometheus_and_run_as_non_root(bundle):
    runtime = load(bundle, "clusterservingruntime.yaml")
    assert runtime["spec"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080",
                                              "prometheus.io/path": "/metrics"}
    security = container(bundle)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]


def test_the_inference_service_names_the_runtime_and_a_format_it_supports(bundle):
    service = load(bundle, "inferenceservice.yaml")
    runtime = load(bundle, "clusterservingruntime.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    assert service["metadata"]["name"] == "repo"  # the repository folder's name
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert "storageUri" not in model  # the repository travels in the image


def test_resource_flags_become_requests_and_limits(affine_repo, tmp_path):
    out = tmp_path / "k8s"
    assert run_k8s(affine_repo.root, out, "--cpu-request", "500m", "--memory-request", "512Mi",
                   "--cpu-limit", "2", "--memory-limit", "none") == 0
    expected = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "2"}}
    assert load(out, "inferenceservice.yaml")["spec"]["predictor"]["model"]["resources"] == expected
    assert container(out)["resources"] == expected


def test_the_repository_is_copied_without_its_runtime_state(affine_repo, tmp_path):
    (affine_repo.root / ".monitor").mkdir(exist_ok=True)
    (affine_repo.root / ".monitor" / "predictions.db").write_bytes(b"log")
    out = tmp_path / "k8s"
    assert run_k8s(affine_repo.root, out) == 0
    assert (out / "models" / "affine" / "1" / "manifest.json").is_file()
    assert [p for p in (out / "models").rglob(".*")] == []  # no profiles here, and no runtime state


def test_the_dockerfile_builds_a_lean_non_root_server_image(bundle):
    text = (bundle / "Dockerfile").read_text()
    assert text.startswith("FROM python:3.11-slim\n")
    assert re.search(r"^ENV .*ORT_DISABLE_TELEMETRY=1", text, re.M)
    assert "torch" not in text  # an ONNX repository needs no PyTorch
    assert "COPY --chown=1000:1000 models/ /mnt/models/" in text
    user, cmd = text.index("USER 1000"), text.index("\nCMD [")
    assert user < cmd and "HEALTHCHECK" in text and "/v2/health/ready" in text[text.index("HEALTHCHECK"):]
    command = json.loads(text[cmd + len("\nCMD "):].strip())
    args = build_parser().parse_args(command[1:])
    assert command[0] == "leanserve" and (args.repo_path, args.host, args.port, args.grpc_port) == (
        "/mnt/models", "0.0.0.0", 8080, 8081)


def test_a_repository_served_with_torch_gets_the_pinned_cpu_build(affine_repo, tmp_path):
    affine_repo.update_config("affine", runtime=RuntimeOptions(engine="torch"))
    out = tmp_path / "k8s"
    assert run_k8s(affine_repo.root, out) == 0
    text = (out / "Dockerfile").read_text()
    makefile_pin = re.search(r"^TORCH_PIN := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"--index-url https://download.pytorch.org/whl/cpu {makefile_pin}" in text
    assert '"leanserve[torch]==' in text


def test_a_storage_uri_is_fetched_by_kserve_instead_of_baked_in(affine_repo, tmp_path):
    out = tmp_path / "k8s"
    assert run_k8s(affine_repo.root, out, "--storage-uri", "s3://models/digits", "--name", "digits",
                   "--namespace", "serving") == 0
    service = load(out, "inferenceservice.yaml")
    assert service["spec"]["predictor"]["model"]["storageUri"] == "s3://models/digits"
    assert service["metadata"] == {**service["metadata"], "name": "digits", "namespace": "serving"}
    assert not (out / "models").exists() and "COPY --chown=1000:1000 models/" not in (out / "Dockerfile").read_text()
    # KServe mounts a fetched repository read-only: the prediction log is written outside it
    args = build_parser().parse_args(container(out)["args"])
    assert not args.no_monitor and args.monitor_db == "/tmp/leanserve/predictions.db"


def user_error(capsys, code: int) -> str:
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--image", "Acme/Server:1"], "not an image reference"),
    (["--image", "ghcr.io/acme/leanserve:bad tag"], "not an image reference"),
    (["--cpu-request", "1 core"], "not a Kubernetes quantity"),
    (["--memory-request=0Mi"], "must be above zero"),
    (["--memory-request", "4Gi", "--memory-limit", "2Gi"], "memory limit 2Gi is below the memory request 4Gi"),
    (["--name", "My_Model"], "name 'My_Model'"),
    (["--storage-uri", "http://example.com/repo"], "storage URI"),
])
def test_bad_flags_are_one_clear_error_and_nothing_is_written(affine_repo, tmp_path, capsys, flags, message):
    out = tmp_path / "k8s"
    argv = ["k8s", str(affine_repo.root), "--image", IMAGE, "--out", str(out), *flags]
    assert message in user_error(capsys, main(argv))
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_missing_or_empty_repository_is_refused(tmp_path, capsys):
    assert "no such repository folder" in user_error(capsys, run_k8s(tmp_path / "nowhere", tmp_path / "k8s"))
    (tmp_path / "empty").mkdir()
    assert "holds no model version" in user_error(capsys, run_k8s(tmp_path / "empty", tmp_path / "k8s"))


def test_an_out_folder_with_other_files_is_left_alone(affine_repo, tmp_path, capsys):
    out = tmp_path / "k8s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "notes.txt" in user_error(capsys, run_k8s(affine_repo.root, out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_rerun_replaces_its_earlier_output_and_keeps_a_users_wheel(affine_repo, bundle):
    wheel = bundle / "wheels" / "mylib-1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    assert run_k8s(affine_repo.root, bundle, "--image", "registry.local:5000/leanserve:2") == 0
    assert container(bundle)["image"] == "registry.local:5000/leanserve:2" and wheel.read_bytes() == b"wheel"
    assert [p.name for p in bundle.parent.iterdir() if p.name.startswith(".")] == []


def test_a_write_that_fails_midway_leaves_the_earlier_output_whole(affine_repo, bundle, monkeypatch):
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_module.shutil, "copytree", disk_full)
    spec = k8s.DeploySpec(name="repo", image="ghcr.io/acme/leanserve:2")
    with pytest.raises(OSError):
        k8s.write_bundle(spec, affine_repo.root, bundle)
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    assert [p.name for p in bundle.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("image", ["leanserve", "localhost:5000/leanserve:0.1", "ghcr.io/acme/lean-serve_x:v1.0-rc1",
                                   "docker.io/library/python@sha256:" + "a" * 64])
def test_image_references_docker_accepts_are_accepted(image):
    assert k8s.DeploySpec(name="m", image=image).image == image


def test_without_the_extra_the_command_names_it(affine_repo, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    monkeypatch.delitem(sys.modules, "leanserve.deploy.k8s")
    monkeypatch.delattr(leanserve.deploy, "k8s")
    err = user_error(capsys, run_k8s(affine_repo.root, tmp_path / "k8s"))
    assert "pip install 'leanserve[k8s]'" in err


def test_write_bundle_refuses_a_file_in_the_way(affine_repo, tmp_path):
    (tmp_path / "k8s").write_text("x")
    with pytest.raises(InvalidInput, match="a file is in the way"):
        k8s.write_bundle(k8s.DeploySpec(name="m", image=IMAGE), affine_repo.root, tmp_path / "k8s")


def test_the_install_step_installs_the_bundles_wheel_offline(bundle, tmp_path):
    import subprocess

    text = (bundle / "Dockerfile").read_text()
    (run,) = [line for line in text.splitlines() if line.startswith("RUN pip install --no-index")]
    command = run.removeprefix("RUN ").split(" \\")[0].split(" && ")[0].replace("/tmp/wheels", str(bundle / "wheels"))
    assert command == k8s.install_command(str(bundle / "wheels"))
    args = command.split()
    assert args[:2] == ["pip", "install"]
    target = tmp_path / "site"  # a throwaway install folder: --no-index, so nothing is fetched
    done = subprocess.run([sys.executable, "-m", *args, "--target", str(target), "--quiet"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (target / "leanserve" / "deploy" / "batch" / "runner.py").is_file()
    assert (target / "leanserve" / "deploy" / "edge" / "c" / "kernels.c").is_file()  # package data travels
    assert [p.name for p in target.glob("leanserve-*.dist-info")] == [f"leanserve-{leanserve.__version__}.dist-info"]


def test_only_the_versions_a_server_loads_travel_with_their_profiles(affine_repo, tmp_path):
    source = affine_repo.get("affine").model_path
    affine_repo.add(source, "affine", serve=True)  # version 2 takes all traffic; 1 is retired
    profiles = affine_repo.root / "affine" / ".profiles"
    profiles.mkdir(exist_ok=True)
    for version in (1, 2):
        (profiles / f"{version}.json").write_text("{}")
    out = tmp_path / "k8s"
    assert run_k8s(affine_repo.root, out) == 0
    assert sorted(p.name for p in (out / "models" / "affine").iterdir()) == [".profiles", "2", "config.json"]
    assert [p.name for p in (out / "models" / "affine" / ".profiles").iterdir()] == ["2.json"]
