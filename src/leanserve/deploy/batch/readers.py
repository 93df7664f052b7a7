"""Which reader takes an input: a table (Parquet, CSV, JSON lines), an array file (.npy, .npz) or a folder
of images. Each reader yields the input's rows as numbered chunks of model inputs, rows it cannot use set
aside with their reasons, so every executor cuts the same input into the same chunks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from leanserve.artifact import Signature
from leanserve.deploy.batch.arrays import array_chunks, array_rows
from leanserve.deploy.batch.chunk import Chunk
from leanserve.deploy.batch.images import image_chunks, image_files
from leanserve.deploy.batch.tables import TABLE_SUFFIXES, parquet_rows, table_chunks
from leanserve.errors import InvalidInput, UnsupportedFormat

ARRAY_SUFFIXES = (".npy", ".npz")


def is_dataset(path: Path) -> bool:
    """Whether ``path`` is a dataset for a batch job rather than one request."""
    return path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES


def read_chunks(path: Path, signature: Signature, chunk_rows: int, id_column: str | None = None,
                allow_nonfinite: bool = False) -> Iterator[Chunk]:
    """The input's rows, ``chunk_rows`` at a time, as model inputs (with rejected rows set aside).

    Raises InvalidInput for a missing or unreadable input, UnsupportedFormat for a kind of file no reader
    takes."""
    if not path.exists():
        raise InvalidInput(f"{path}: no such input file or folder")
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from image_chunks(path, signature, chunk_rows)
    elif suffix in TABLE_SUFFIXES:
        yield from table_chunks(path, TABLE_SUFFIXES[suffix], signature, chunk_rows, id_column, allow_nonfinite)
    elif suffix in ARRAY_SUFFIXES:
        yield from array_chunks(path, signature, chunk_rows, allow_nonfinite)
    else:
        raise UnsupportedFormat(f"{path.name}: batch input must be Parquet, CSV, JSON lines (.jsonl), .npy, .npz "
                                "or a folder of images")


def count_rows(path: Path) -> int | None:
    """Rows in the input when cheap to know (Parquet metadata, array headers, files in a folder), else None."""
    try:
        if path.is_dir():
            return len(image_files(path))
        if path.suffix.lower() == ".parquet":
            return parquet_rows(path)
        return array_rows(path)
    except (OSError, ValueError):
        return None
