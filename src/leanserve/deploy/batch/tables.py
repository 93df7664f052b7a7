"""Batch input from tables: Parquet, CSV and JSON lines, read in chunks through pyarrow datasets.

Columns map to inputs by name (a column per input, holding each row's values, a list for inputs of rank > 1,
text for a BYTES input of a text pipeline), or, for a model with one [N, F] input, the F feature columns in
order. Rows that cannot be used (missing or unparsable values, the wrong width, NaN or Inf) are set aside
with their id and the reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from leanserve.artifact import Signature
from leanserve.deploy.batch.chunk import Chunk, first_line, jsonable
from leanserve.errors import InvalidInput, LeanserveError, UnsupportedFormat

TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json"}


def parquet_rows(path: Path) -> int:
    """Rows in a Parquet file, from its metadata."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _dataset(path: Path, fmt: str):
    try:
        import pyarrow.dataset as ds
    except ImportError:
        raise UnsupportedFormat("batch jobs on tables need pyarrow: pip install 'leanserve[batch]'") from None
    try:
        return ds.dataset(str(path), format=fmt)
    except Exception as exc:  # pyarrow raises its own hierarchy (ArrowInvalid, ArrowIOError...)
        raise InvalidInput(f"{path.name}: unreadable {fmt} input ({str(exc).splitlines()[0]})") from exc


def table_chunks(path: Path, fmt: str, signature: Signature, chunk_rows: int, id_column: str | None,
                  allow_nonfinite: bool) -> Iterator[Chunk]:
    """The table's rows, ``chunk_rows`` at a time; ids from ``id_column`` (or a column named ``id``), else row
    numbers. Raises InvalidInput for an unreadable table or columns that do not fit the signature."""
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
    rejects = [{"id": jsonable(ids[i].as_py()), "reason": reasons[i]} for i in sorted(reasons)]
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
            reasons.setdefault(i, f"input {spec.name!r}: {first_line(exc)}")
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
