"""The ``leanserve k8s`` command: a Dockerfile and KServe manifests that run a repository's server."""

from __future__ import annotations

import re
from pathlib import Path

from leanserve.errors import InvalidInput


def _k8s_module():
    """``leanserve.deploy.k8s``, or InvalidInput naming the extra when its libraries are missing."""
    try:
        from leanserve.deploy import k8s
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("kubernetes", "yaml"):
            raise InvalidInput(f"leanserve k8s needs the Kubernetes client ({exc.name} is not installed): "
                               "pip install 'leanserve[k8s]'") from None
        raise
    return k8s


def _default_name(repo: Path) -> str:
    """The repository folder's name as a Kubernetes name (``model_repo`` -> ``model-repo``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", repo.resolve().name.lower()).strip("-")[:63].strip("-")
    return name or "leanserve"


def _limit(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() in ("", "none") else value


def cmd_k8s(args) -> int:
    k8s = _k8s_module()
    repo = Path(args.repo_path or args.repo)
    resources = k8s.Resources(cpu_request=args.cpu_request, memory_request=args.memory_request,
                              cpu_limit=_limit(args.cpu_limit), memory_limit=_limit(args.memory_limit))
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


def add_k8s_command(sub, command, add_repo) -> None:
    """Add ``leanserve k8s`` to the main parser."""
    p = command(sub, "k8s", cmd_k8s,
                "write a Dockerfile and KServe manifests (ClusterServingRuntime + InferenceService) that serve a "
                "repository over the V2 protocol",
                "leanserve k8s model-repo --image ghcr.io/acme/leanserve:0.1.0 --out k8s\n"
                "  leanserve k8s model-repo --image ghcr.io/acme/leanserve:0.1.0 --storage-uri s3://models/repo")
    p.add_argument("repo_path", nargs="?", metavar="REPO", help="repository folder (default: --repo)")
    p.add_argument("--image", required=True, help="image reference the Dockerfile is built as and the runtime runs")
    p.add_argument("--out", default="k8s", metavar="DIR", help="folder to write: new, empty, or an earlier output of this command")
    p.add_argument("--name", help="InferenceService name; the repository folder's name when not given")
    p.add_argument("--namespace", help="namespace of the InferenceService; kubectl's current one when not given")
    p.add_argument("--storage-uri", metavar="URI",
                   help="where KServe fetches the repository from (s3://, gs://, pvc://NAME/PATH, https://, ...); "
                        "when not given, the repository is copied into the image. A fetched repository is read-only, "
                        "so the server runs without its prediction log (no drift, feedback or live quality)")
    p.add_argument("--cpu-request", default="1", metavar="QTY", help="CPU request (e.g. 500m, 2)")
    p.add_argument("--memory-request", default="1Gi", metavar="QTY", help="memory request (e.g. 512Mi)")
    p.add_argument("--cpu-limit", metavar="QTY", help="CPU limit; none when not given (throttling hurts tail latency)")
    p.add_argument("--memory-limit", default="2Gi", metavar="QTY", help="memory limit ('none' for no limit)")
    add_repo(p)
