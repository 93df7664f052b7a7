"""The ``leanserve k8s`` command: a Dockerfile and KServe manifests that run a repository's server."""

from __future__ import annotations

import re
from pathlib import Path

from leanserve.cli.args import add_repo, command, config_default, given, needs_extra

RESOURCES = "leanserve.deploy.k8s:Resources"


def _default_name(repo: Path) -> str:
    """The repository folder's name as a Kubernetes name (``model_repo`` -> ``model-repo``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", repo.resolve().name.lower()).strip("-")[:63].strip("-")
    return name or "leanserve"


def _limits(args) -> dict:
    """--cpu-limit/--memory-limit as given, 'none' (or empty) meaning no limit."""
    return {key: None if value.strip().lower() in ("", "none") else value
            for key, value in given(args, cpu_limit="cpu_limit", memory_limit="memory_limit").items()}


def cmd_k8s(args) -> int:
    with needs_extra("k8s", "k8s", "kubernetes", "yaml"):
        from leanserve.deploy import k8s
    repo = Path(args.repo_path or args.repo)
    resources = k8s.Resources(**given(args, cpu_request="cpu_request", memory_request="memory_request"), **_limits(args))
    spec = k8s.DeploySpec(name=args.name or _default_name(repo), image=args.image, storage_uri=args.storage_uri,
                          namespace=args.namespace, resources=resources, extras=k8s.repository_extras(repo))
    out = Path(args.out)
    written = k8s.write_bundle(spec, repo, out)
    models = [p for p in written if p.parts[0] == "models"]
    print(f"wrote {out}/: Dockerfile, clusterservingruntime.yaml, inferenceservice.yaml"
          + (f", models/ ({len(models)} files of {repo})" if models else ""))
    print(f"image extras: {', '.join(spec.extras) or 'none (ONNX Runtime only)'}; "
          f"repository: {spec.storage_uri or 'copied into the image at ' + k8s.MODEL_DIR}")
    print("next:\n"
          f"  docker build -t {spec.image} {out} && docker push {spec.image}\n"
          f"  kubectl apply -f {out}/clusterservingruntime.yaml -f {out}/inferenceservice.yaml")
    return 0


def register(sub) -> None:
    """Add k8s."""
    p = command(sub, "k8s", cmd_k8s,
                "write a Dockerfile and KServe manifests (ClusterServingRuntime + InferenceService) that serve a "
                "repository over the V2 protocol",
                "leanserve k8s model-repo --image ghcr.io/acme/leanserve:0.1.0 --out k8s\n"
                "  leanserve k8s model-repo --image ghcr.io/acme/leanserve:0.1.0 --storage-uri s3://models/repo")
    p.add_argument("repo_path", nargs="?", metavar="REPO", help="repository folder (default: --repo)")
    p.add_argument("--image", required=True, help="image reference the Dockerfile is built as and the runtime runs")
    p.add_argument("--out", default="k8s", metavar="DIR", help="folder to write: new, empty, or an earlier output of this command "
                   "(default: %(default)s)")
    p.add_argument("--name", help="InferenceService name; the repository folder's name when not given")
    p.add_argument("--namespace", help="namespace of the InferenceService; kubectl's current one when not given")
    p.add_argument("--storage-uri", metavar="URI",
                   help="where KServe fetches the repository from (s3://, gs://, pvc://NAME/PATH, https://, ...); "
                        "when not given, the repository is copied into the image. A fetched repository is read-only, "
                        "so the server runs without its prediction log (no drift, feedback or live quality)")
    config_default(p.add_argument("--cpu-request", metavar="QTY", help="CPU request (e.g. 500m, 2)"), RESOURCES,
                   "cpu_request")
    config_default(p.add_argument("--memory-request", metavar="QTY", help="memory request (e.g. 512Mi)"), RESOURCES,
                   "memory_request")
    p.add_argument("--cpu-limit", metavar="QTY", help="CPU limit; none when not given (throttling hurts tail latency)")
    config_default(p.add_argument("--memory-limit", metavar="QTY", help="memory limit ('none' for no limit)"),
                   RESOURCES, "memory_limit")
    add_repo(p)
