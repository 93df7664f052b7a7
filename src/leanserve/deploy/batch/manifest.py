"""The job manifest, ``_job.json``: which job an output folder holds and which of its chunks are written.

A chunk is recorded only once its part is renamed into place, and the manifest itself is replaced
atomically, so a job killed at any instant leaves whole parts only and the next run with the same
arguments redoes exactly the chunks not recorded. The manifest does not name the executor: a job started
locally can finish on Ray and the reverse.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leanserve.deploy.batch.chunk import ChunkRecord, jsonable
from leanserve.errors import InvalidInput

MANIFEST = "_job.json"
REJECTS = "rejects.jsonl"


@dataclass(frozen=True)
class JobSettings:
    """The knobs of a batch job; those that decide chunk boundaries and rejects are part of its identity."""

    chunk_rows: int = 65536
    batch_size: int = 1024  # rows per engine call
    id_column: str | None = None  # default: a column named "id", else row numbers
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        if self.chunk_rows < 1 or self.batch_size < 1:
            raise InvalidInput("--chunk-rows and --batch-size must be >= 1")


def job_fingerprint(model: str, version: int, input_path: Path, settings: JobSettings) -> dict[str, Any]:
    """What makes two runs the same job: the version, the input (path, size, modification time) and the
    settings that decide chunk boundaries and rejects."""
    stat = input_path.stat()
    size = stat.st_size if input_path.is_file() else sum(p.stat().st_size for p in input_path.iterdir() if p.is_file())
    return {"model": model, "version": version, "input": str(input_path.resolve()), "input_bytes": size,
            "input_mtime": stat.st_mtime, "chunk_rows": settings.chunk_rows, "id_column": settings.id_column,
            "allow_nonfinite": settings.allow_nonfinite}


class JobManifest:
    """An output folder's manifest: opened (or created) for one job, updated one chunk at a time."""

    def __init__(self, output: Path, data: dict[str, Any]) -> None:
        self.output = output
        self._data = data

    @classmethod
    def open(cls, output: Path, fingerprint: Mapping[str, Any]) -> JobManifest:
        """The manifest of ``output``, created when the folder is new or empty.

        Raises InvalidInput when ``output`` is a file, holds a different job, or holds something else."""
        if output.exists() and not output.is_dir():
            raise InvalidInput(f"--output {output} is a file; a batch job writes a folder of Parquet parts")
        path = output / MANIFEST
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("job") != dict(fingerprint):
                changed = [k for k in fingerprint if data.get("job", {}).get(k) != fingerprint[k]]
                raise InvalidInput(f"--output {output} holds a different job (it differs in {', '.join(changed)}); "
                                   "use another --output folder, or remove this one to start over")
            return cls(output, data)
        if output.is_dir() and any(output.iterdir()):
            raise InvalidInput(f"--output {output} exists and is not a leanserve batch job; choose an empty or new folder")
        output.mkdir(parents=True, exist_ok=True)
        job_id = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
        manifest = cls(output, {"job": dict(fingerprint), "id": job_id, "chunks": {}, "finished": False})
        manifest._save()
        return manifest

    @property
    def done(self) -> dict[int, dict[str, Any]]:
        """The recorded chunks by index: part, rows, rejected, rejects."""
        return {int(k): v for k, v in self._data["chunks"].items()}

    def record(self, record: ChunkRecord) -> None:
        """Record a chunk whose part is in place (replacing the manifest atomically)."""
        self._data["chunks"][str(record.index)] = record.manifest_entry()
        self._save()

    def finish(self) -> tuple[int, int]:
        """Write ``rejects.jsonl`` from every chunk's rejects, mark the job finished; returns (written,
        rejected) rows over the whole job, whichever runs and executors did the chunks."""
        chunks = self._data["chunks"]
        tmp = self.output / (REJECTS + ".tmp")
        with tmp.open("w") as file:
            for index in sorted(chunks, key=int):
                for reject in chunks[index]["rejects"]:
                    file.write(json.dumps(reject, default=jsonable) + "\n")
        os.replace(tmp, self.output / REJECTS)
        self._data["finished"] = True
        self._save()
        return sum(int(c["rows"]) for c in chunks.values()), sum(int(c["rejected"]) for c in chunks.values())

    def _save(self) -> None:
        tmp = self.output / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self._data, default=jsonable))
        os.replace(tmp, self.output / MANIFEST)


def read_manifest(output: Path) -> dict[str, Any]:
    """A job folder's manifest as written. Raises InvalidInput when the folder holds no job."""
    try:
        return json.loads((output / MANIFEST).read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{output}: no {MANIFEST}; not a leanserve batch job folder") from None
