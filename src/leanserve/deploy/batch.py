"""Offline batch inference over datasets larger than memory, resumable after any interruption.

``run_job`` reads the input in chunks (Parquet, CSV and JSON lines through pyarrow datasets; .npy
memory-mapped; .npz; a folder of images), turns each chunk's rows into model inputs, sets aside rows it
cannot use (wrong width, unparsable values, NaN or Inf) with their id and the reason, runs the rest
through the version's engine in batches, and writes one Parquet part per chunk.

The output is a folder: ``part-NNNNN.parquet`` (an ``id`` column and one column per model output),
``rejects.jsonl`` and ``_job.json``, the manifest. Each part is written to a temporary name and renamed,
then recorded in the manifest (also replaced atomically), so a job killed at any instant (kill -9
included) leaves whole parts only; the next run with the same arguments skips the recorded chunks and
redoes the rest. No row is written twice: a part's name is its chunk number, and rejects of a chunk are
kept in the manifest with the chunk, not appended to a file that a redo would duplicate.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import Signature
from leanserve.errors import InvalidInput, LeanserveError, UnsupportedFormat

TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json"}
ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST = "_job.json"


@dataclass
class Chunk:
    """Rows read from the input: their ids and the model inputs, plus the rows set aside."""

    index: int
    ids: Any  # a pyarrow array, or a list
    inputs: dict[str, np.ndarray]
    rejects: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class JobSummary:
    rows: int = 0
    written: int = 0
    rejected: int = 0
    chunks_done: int = 0
    chunks_skipped: int = 0
    processed: int = 0  # rows read and run (or rejected) by this run, not by an earlier one
    elapsed_s: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s else 0.0


def is_dataset(path: Path) -> bool:
    """Whether ``path`` is a dataset for a batch job rather than one request."""
    return path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES


# --- reading ------------------------------------------------------------------------------------------

def read_chunks(path: Path, signature: Signature, chunk_rows: int, id_column: str | None = None,
                allow_nonfinite: bool = False) -> Iterator[Chunk]:
    """The input's rows, ``chunk_rows`` at a time, as model inputs (with rejected rows set aside)."""
    if not path.exists():
        raise InvalidInput(f"{path}: no such input file or folder")
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _image_chunks(path, signature, chunk_rows)
    elif suffix in TABLE_SUFFIXES:
        yield from _table_chunks(path, TABLE_SUFFIXES[suffix], signature, chunk_rows, id_column, allow_nonfinite)
    elif suffix in ARRAY_SUFFIXES:
        yield from _array_chunks(path, signature, chunk_rows, allow_nonfinite)
    else:
        raise UnsupportedFormat(f"{path.name}: batch input must be Parquet, CSV, JSON lines (.jsonl), .npy, .npz "
                                "or a folder of images")


def count_rows(path: Path) -> int | None:
    """Rows in the input when cheap to know (Parquet metadata, array headers, files in a folder)."""
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if suffix == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
    except (OSError, ValueError):
        return None
    return None


def _dataset(path: Path, fmt: str):
    try:
        import pyarrow.dataset as ds
    except ImportError:
        raise UnsupportedFormat("batch jobs on tables need pyarrow: pip install 'leanserve[batch]'") from None
    try:
        return ds.dataset(str(path), format=fmt)
    except Exception as exc:  # pyarrow raises its own hierarchy (ArrowInvalid, ArrowIOError...)
        raise InvalidInput(f"{path.name}: unreadable {fmt} input ({str(exc).splitlines()[0]})") from exc


def _table_chunks(path: Path, fmt: str, signature: Signature, chunk_rows: int, id_column: str | None,
                  allow_nonfinite: bool) -> Iterator[Chunk]:
    dataset = _dataset(path, fmt)
    schema = dataset.schema
    id_column = id_column or ("id" if "id" in schema.names else None)
    if id_column and id_column not in schema.names:
        raise InvalidInput(f"--id-column {id_column!r} is not a column of {path.name}; columns: {', '.join(schema.names)}")
    plan = _column_plan(signature, [n for n in schema.names if n != id_column], path.name)
    offset = 0
    try:
        batches = dataset.to_batches(batch_size=chunk_rows)
        pending: list = []
        pending_rows = 0
        index = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= chunk_rows:
                table, pending, pending_rows = _take(pending, chunk_rows)
                yield _table_chunk(index, table, offset, id_column, plan, signature, allow_nonfinite)
                offset += table.num_rows
                index += 1
        if pending_rows:
            table, _, _ = _take(pending, pending_rows)
            yield _table_chunk(index, table, offset, id_column, plan, signature, allow_nonfinite)
    except LeanserveError:
        raise
    except Exception as exc:  # a row pyarrow cannot parse, a schema that changes between files
        raise InvalidInput(f"{path.name}: reading stopped near row {offset}: {str(exc).splitlines()[0]}") from exc


def _take(batches: list, rows: int):
    import pyarrow as pa

    table = pa.Table.from_batches(batches)
    return table.slice(0, rows), table.slice(rows).to_batches(), table.num_rows - rows


def _column_plan(signature: Signature, columns: Sequence[str], where: str) -> dict[str, list[str]]:
    """Which columns feed which input: a column named after an input holds that input's row (a list,
    for inputs of rank > 1); else a single input of shape [N, F] takes the F remaining columns in order."""
    named = {spec.name: [spec.name] for spec in signature.inputs if spec.name in columns}
    if len(named) == len(signature.inputs):
        return named
    if len(signature.inputs) == 1 and not named:
        spec = signature.inputs[0]
        width = spec.shape[1] if len(spec.shape) == 2 else None
        if width not in (None, -1) and width != len(columns):
            raise InvalidInput(f"{where}: {len(columns)} feature columns, but input {spec.name!r} takes {width} "
                               f"({list(spec.shape)}); name the id column with --id-column, or drop extra columns")
        return {spec.name: list(columns)}
    missing = [s.name for s in signature.inputs if s.name not in named]
    raise InvalidInput(f"{where}: no column for input {missing[0]!r}; the model takes {', '.join(signature.input_names)} "
                       "(one column per input, holding each row's values)")


def _table_chunk(index: int, table, offset: int, id_column: str | None, plan: Mapping[str, list[str]],
                 signature: Signature, allow_nonfinite: bool) -> Chunk:
    import pyarrow as pa

    n = table.num_rows
    ids = table.column(id_column).combine_chunks() if id_column else pa.array(np.arange(offset, offset + n))
    good = np.ones(n, dtype=bool)
    reasons: dict[int, str] = {}
    arrays: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        columns = plan[spec.name]
        if spec.datatype == "BYTES" and spec.shape == (-1,) and columns == [spec.name]:
            arrays[spec.name] = _text_column(table.column(spec.name), spec, good, reasons)
        elif len(columns) == 1 and columns[0] == spec.name and (len(spec.shape) != 2 or _is_list(table, columns[0])):
            arrays[spec.name] = _list_column(table.column(columns[0]), spec, good, reasons)
        else:
            array = np.empty((n, len(columns)), dtype=spec.dtype)
            for j, name in enumerate(columns):
                column, bad = _numeric(table.column(name), spec.dtype)
                array[:, j] = column
                for i in np.flatnonzero(bad):
                    good[i] = False
                    value = table.column(name)[int(i)].as_py()
                    reasons.setdefault(int(i), f"column {name!r}: " + ("missing value" if value is None else f"not a number ({value!r})"))
            arrays[spec.name] = array
        array = arrays[spec.name]
        if not allow_nonfinite and array.dtype.kind == "f":
            nonfinite = ~np.isfinite(array.reshape(n, -1)).all(axis=1)
            for i in np.flatnonzero(nonfinite & good):
                reasons[int(i)] = f"input {spec.name!r}: NaN or Inf (the model refuses them; --allow-nan to pass them)"
            good &= ~nonfinite
    rejects = [{"id": _jsonable(ids[i].as_py()), "reason": reasons[i]} for i in sorted(reasons)]
    if good.all():  # the common case: no copies
        return Chunk(index, ids, arrays, rejects)
    keep = np.flatnonzero(good)
    return Chunk(index, ids.take(pa.array(keep)), {k: v[keep] for k, v in arrays.items()}, rejects)


def _text_column(column, spec, good: np.ndarray, reasons: dict[int, str]) -> np.ndarray:
    """A text (or binary) column as a [N] BYTES array of UTF-8 bytes, what a text pipeline takes; missing
    values are marked bad."""
    values = column.to_pylist()
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        if value is None:
            good[i] = False
            reasons.setdefault(i, f"input {spec.name!r}: missing value")
            value = b""
        array[i] = value.encode("utf-8") if isinstance(value, str) else bytes(value) if isinstance(value, bytes) else str(value).encode()
    return array


def _list_column(column, spec, good: np.ndarray, reasons: dict[int, str]) -> np.ndarray:
    """A column of per-row lists as an array [N, *row shape]; rows of the wrong length are marked bad."""
    import pyarrow as pa

    n = len(column)
    row_shape = tuple(max(d, 1) for d in spec.shape[1:])
    size = int(np.prod(row_shape))
    array = np.zeros((n, *row_shape), dtype=spec.dtype)
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if -1 not in spec.shape[1:] and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
                                     or pa.types.is_fixed_size_list(column.type)) and column.null_count == 0:
        offsets = (np.arange(n + 1) * column.type.list_size if pa.types.is_fixed_size_list(column.type)
                   else column.offsets.to_numpy())
        lengths = np.diff(offsets)
        values = column.flatten()
        if values.null_count == 0 and (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            flat = values.to_numpy(zero_copy_only=False)
            right = lengths == size
            if right.all():
                return flat.astype(spec.dtype, copy=False).reshape(n, *row_shape)
            starts = offsets[:-1]
            for i in np.flatnonzero(right):
                array[i] = flat[starts[i]:starts[i] + size].reshape(row_shape)
            for i in np.flatnonzero(~right):
                good[i] = False
                reasons.setdefault(int(i), f"input {spec.name!r}: {lengths[i]} values, expected {size} ({list(row_shape)})")
            return array
    for i, value in enumerate(column.to_pylist()):  # ragged, nulls or text: row by row
        try:
            array[i] = np.asarray(value, dtype=spec.dtype).reshape(row_shape)
        except (TypeError, ValueError) as exc:
            good[i] = False
            reasons.setdefault(i, f"input {spec.name!r}: {_short(exc)}")
    return array


def _is_list(table, name: str) -> bool:
    import pyarrow as pa

    return pa.types.is_list(table.schema.field(name).type) or pa.types.is_large_list(table.schema.field(name).type) \
        or pa.types.is_fixed_size_list(table.schema.field(name).type)


def _numeric(column, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A column as numbers; the mask of entries that are not (unparsable strings, nulls)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        text = column.to_pylist()
        values = np.empty(len(text), dtype=np.float64)
        bad = np.zeros(len(text), dtype=bool)
        for i, item in enumerate(text):
            try:
                values[i] = float(item)
            except (TypeError, ValueError):
                bad[i] = True
                values[i] = 0
        return values.astype(dtype), bad
    if column.null_count == 0:
        return np.asarray(column.to_numpy()).astype(dtype, copy=False), np.zeros(len(column), dtype=bool)
    bad = np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False), dtype=bool)
    return np.asarray(column.fill_null(0).to_numpy(zero_copy_only=False)).astype(dtype, copy=False), bad


def _array_chunks(path: Path, signature: Signature, chunk_rows: int, allow_nonfinite: bool) -> Iterator[Chunk]:
    try:
        if path.suffix.lower() == ".npy":
            if len(signature.inputs) != 1:
                raise InvalidInput(f"{path.name}: a .npy file holds one array; the model takes {signature.input_names}: use .npz")
            arrays = {signature.inputs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
        else:
            archive = np.load(path, allow_pickle=False)
            arrays = {spec.name: archive[spec.name] for spec in signature.inputs if spec.name in archive.files}
            missing = [s.name for s in signature.inputs if s.name not in arrays]
            if missing:
                raise InvalidInput(f"{path.name}: no array for input {missing[0]!r}; it holds {', '.join(archive.files)}")
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: unreadable array file ({exc})") from exc
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise InvalidInput(f"{path.name}: the arrays have different row counts {sorted(lengths)}")
    total = lengths.pop()
    for index, start in enumerate(range(0, total, chunk_rows)):
        stop = min(start + chunk_rows, total)
        inputs = {name: np.ascontiguousarray(a[start:stop]) for name, a in arrays.items()}
        ids = list(range(start, stop))
        good = np.ones(stop - start, dtype=bool)
        rejects = []
        for spec in signature.inputs:
            array = inputs[spec.name]
            if array.shape[1:] != tuple(d if d != -1 else array.shape[i + 1] for i, d in enumerate(spec.shape[1:])):
                raise InvalidInput(f"{path.name}: input {spec.name!r} rows have shape {list(array.shape[1:])}, "
                                   f"the model takes {list(spec.shape[1:])}")
            if array.dtype != np.dtype(spec.dtype):
                inputs[spec.name] = array = array.astype(spec.dtype)
            if not allow_nonfinite and array.dtype.kind == "f":
                nonfinite = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
                for i in np.flatnonzero(nonfinite & good):
                    rejects.append({"id": ids[i], "reason": f"input {spec.name!r}: NaN or Inf (--allow-nan to pass them)"})
                good &= ~nonfinite
        keep = np.flatnonzero(good)
        yield Chunk(index, [ids[i] for i in keep], {k: v[keep] for k, v in inputs.items()}, rejects)


def _image_chunks(folder: Path, signature: Signature, chunk_rows: int) -> Iterator[Chunk]:
    """Images as float32 in [0, 1], resized to the input's [C, H, W] (or [H, W]); C 1 = grayscale, 3 = RGB."""
    from PIL import Image, UnidentifiedImageError

    if len(signature.inputs) != 1 or len(signature.inputs[0].shape) not in (3, 4):
        raise InvalidInput("a folder of images needs a model with one image input of shape [N, C, H, W] or [N, H, W]")
    spec = signature.inputs[0]
    *channels, height, width = spec.shape[1:]
    if -1 in (height, width) or (channels and channels[0] not in (1, 3)):
        raise InvalidInput(f"input {spec.name!r} {list(spec.shape)}: images need a fixed size and 1 or 3 channels")
    mode = "RGB" if channels and channels[0] == 3 else "L"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidInput(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    for index, start in enumerate(range(0, len(files), chunk_rows)):
        ids, rows, rejects = [], [], []
        for file in files[start:start + chunk_rows]:
            try:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert(mode).resize((width, height)), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as exc:
                rejects.append({"id": file.name, "reason": f"unreadable image: {_short(exc)}"})
                continue
            rows.append(pixels.transpose(2, 0, 1) if mode == "RGB" else (pixels[None] if channels else pixels))
            ids.append(file.name)
        inputs = {spec.name: np.stack(rows).astype(spec.dtype)} if rows else {}
        yield Chunk(index, ids, inputs, rejects)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _jsonable(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# --- the job ------------------------------------------------------------------------------------------

def job_fingerprint(model: str, version: int, input_path: Path, chunk_rows: int, id_column: str | None,
                    allow_nonfinite: bool) -> dict[str, Any]:
    """What makes two runs the same job: the version, the input (path, size, modification time) and the
    settings that decide chunk boundaries and rejects."""
    stat = input_path.stat()
    size = stat.st_size if input_path.is_file() else sum(p.stat().st_size for p in input_path.iterdir() if p.is_file())
    return {"model": model, "version": version, "input": str(input_path.resolve()), "input_bytes": size,
            "input_mtime": stat.st_mtime, "chunk_rows": chunk_rows, "id_column": id_column,
            "allow_nonfinite": allow_nonfinite}


def run_job(session, model: str, version: int, input_path: str | Path, output: str | Path, *, chunk_rows: int = 65536,
            batch_size: int = 1024, id_column: str | None = None, allow_nonfinite: bool = False,
            progress: bool = True) -> JobSummary:
    """Run ``session`` over the input, resuming a job already started in ``output`` with the same arguments.

    Raises InvalidInput when ``output`` holds a different job or is a file, and for unreadable input."""
    from tqdm import tqdm

    if chunk_rows < 1 or batch_size < 1:
        raise InvalidInput("--chunk-rows and --batch-size must be >= 1")
    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise InvalidInput(f"{input_path}: no such input file or folder")
    fingerprint = job_fingerprint(model, version, input_path, chunk_rows, id_column, allow_nonfinite)
    manifest = _open_manifest(output, fingerprint)
    done = {int(k): v for k, v in manifest["chunks"].items()}
    summary = JobSummary(chunks_skipped=len(done))
    started = time.perf_counter()
    total = count_rows(input_path)
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc=f"{model}:{version}", disable=not progress)
    for record in done.values():
        bar.update(record["rows"] + record["rejected"])
    signature = session.signature
    admit = getattr(session, "admit", None)  # a text or image pipeline checks each row (empty, too long, corrupt)
    # Parts are written (and recorded) on a thread while the engine runs the next chunk; at most one part
    # waits, so memory stays at about three chunks whatever the input's size.
    writer = _Writer(output, manifest, signature)
    try:
        for chunk in _prefetched(read_chunks(input_path, signature, chunk_rows, id_column, allow_nonfinite)):
            if chunk.index in done:
                continue
            if admit is not None:
                chunk = _admitted(chunk, admit)
            writer.put(chunk, _run(session, chunk.inputs, batch_size) if len(chunk.ids) else None)
            summary.chunks_done += 1
            summary.processed += len(chunk.ids) + len(chunk.rejects)
            bar.update(len(chunk.ids) + len(chunk.rejects))
    finally:
        writer.close()
    bar.close()
    finish_job(output, manifest, summary)
    summary.elapsed_s = time.perf_counter() - started
    return summary


def finish_job(output: Path, manifest: dict[str, Any], summary: JobSummary) -> None:
    """Every chunk is recorded: write the rejects file, mark the job finished, total the summary
    (whichever executor ran the chunks)."""
    _write_rejects(output, manifest)
    manifest["finished"] = True
    _save_manifest(output, manifest)
    summary.written = sum(int(c["rows"]) for c in manifest["chunks"].values())
    summary.rejected = sum(int(c["rejected"]) for c in manifest["chunks"].values())
    summary.rows = summary.written + summary.rejected


class _Writer:
    """Writes parts and records them in the manifest, in order, on one thread."""

    def __init__(self, output: Path, manifest: dict[str, Any], signature: Signature) -> None:
        import queue
        import threading

        self.output, self.manifest, self.signature = output, manifest, signature
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="batch-writer", daemon=True)
        self._thread.start()

    def put(self, chunk: Chunk, outputs: Mapping[str, np.ndarray] | None) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((chunk, outputs))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the job stops at the next put
            chunk, outputs = item
            try:
                part = None  # a chunk whose every row was rejected has no part
                if outputs is not None:
                    part = self.output / f"part-{chunk.index:05d}.parquet"
                    _write_part(part, chunk.ids, outputs, self.signature)
                self.manifest["chunks"][str(chunk.index)] = {"part": part and part.name, "rows": len(chunk.ids),
                                                             "rejected": len(chunk.rejects), "rejects": chunk.rejects}
                _save_manifest(self.output, self.manifest)
            except BaseException as exc:  # a full disk, a vanished folder: raised on the job's thread
                self._error = exc


def _prefetched(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """Read the next chunk on a thread while the engine runs this one (Parquet decoding releases the GIL)."""
    import queue
    import threading

    ahead: queue.Queue = queue.Queue(maxsize=1)
    done = object()

    def read() -> None:
        try:
            for chunk in chunks:
                ahead.put(chunk)
            ahead.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            ahead.put(exc)

    threading.Thread(target=read, name="batch-reader", daemon=True).start()
    while True:
        item = ahead.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _admitted(chunk: Chunk, admit) -> Chunk:
    """The chunk without the rows its pipeline refuses (an empty or over-long text, a corrupt image), each
    set aside with the reason, so one bad row never fails its chunk."""
    import pyarrow as pa

    n = len(chunk.ids)
    keep = []
    for i in range(n):
        try:
            admit({k: v[i:i + 1] for k, v in chunk.inputs.items()})
            keep.append(i)
        except InvalidInput as exc:
            value = chunk.ids[i]
            chunk.rejects.append({"id": _jsonable(value.as_py() if hasattr(value, "as_py") else value), "reason": str(exc)})
    if len(keep) == n:
        return chunk
    ids = chunk.ids.take(pa.array(keep, type=pa.int64())) if hasattr(chunk.ids, "take") else [chunk.ids[i] for i in keep]
    return Chunk(chunk.index, ids, {k: v[keep] for k, v in chunk.inputs.items()}, chunk.rejects)


def _run(session, inputs: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    n = len(next(iter(inputs.values())))
    parts = [session.run({k: v[i:i + batch_size] for k, v in inputs.items()}) for i in range(0, n, batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _write_part(path: Path, ids: list, outputs: Mapping[str, np.ndarray], signature: Signature) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"id": ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids)}
    for spec in signature.outputs:
        values = outputs[spec.name]
        flat = values.reshape(len(values), -1) if values.ndim > 1 else values
        if flat.ndim == 1:
            columns[spec.name] = pa.array(flat)
        else:
            columns[spec.name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


def _open_manifest(output: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    if output.exists() and not output.is_dir():
        raise InvalidInput(f"--output {output} is a file; a batch job writes a folder of Parquet parts")
    path = output / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("job") != dict(fingerprint):
            changed = [k for k in fingerprint if manifest.get("job", {}).get(k) != fingerprint[k]]
            raise InvalidInput(f"--output {output} holds a different job (it differs in {', '.join(changed)}); "
                               "use another --output folder, or remove this one to start over")
        return manifest
    if output.is_dir() and any(output.iterdir()):
        raise InvalidInput(f"--output {output} exists and is not a leanserve batch job; choose an empty or new folder")
    output.mkdir(parents=True, exist_ok=True)
    manifest = {"job": dict(fingerprint), "id": hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12],
                "chunks": {}, "finished": False}
    _save_manifest(output, manifest)
    return manifest


def _save_manifest(output: Path, manifest: Mapping[str, Any]) -> None:
    tmp = output / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, default=_jsonable))
    os.replace(tmp, output / MANIFEST)


def _write_rejects(output: Path, manifest: Mapping[str, Any]) -> None:
    tmp = output / "rejects.jsonl.tmp"
    with tmp.open("w") as file:
        for index in sorted(manifest["chunks"], key=int):
            for reject in manifest["chunks"][index]["rejects"]:
                file.write(json.dumps(reject, default=_jsonable) + "\n")
    os.replace(tmp, output / "rejects.jsonl")


def read_output(output: str | Path):
    """The finished job's rows as one pyarrow Table (id and outputs), in chunk order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = Path(output)
    manifest = json.loads((output / MANIFEST).read_text())
    parts = [pq.read_table(output / manifest["chunks"][k]["part"]) for k in sorted(manifest["chunks"], key=int)
             if manifest["chunks"][k]["part"]]
    return pa.concat_tables(parts) if parts else pa.table({})

