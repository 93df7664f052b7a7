"""`leanserve predict` over a text column (CSV, JSON lines, Parquet) with a text pipeline version."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pyarrow")
import minilm_support  # noqa: E402
from minilm_support import HELD_OUT, cosines  # noqa: E402

from leanserve.cli import main  # noqa: E402


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_a_text_column_is_embedded_and_bad_rows_are_set_aside(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    texts = [*HELD_OUT, "", "word " * 400]
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    path = tmp_path / f"texts.{suffix}"
    if suffix == "csv":
        pyarrow.csv.write_csv(table, path)
    elif suffix == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    out = tmp_path / "out"
    repo = minilm_support.repo()
    assert main(["predict", "minilm", "--input", str(path), "--output", str(out), "--repo", str(repo)]) == 0
    result = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]).sort_by("id")
    assert result.column("id").to_pylist() == list(range(len(HELD_OUT)))
    embeddings = np.array(result.column("embedding").to_pylist())
    assert cosines(embeddings, minilm_support.encoder()(HELD_OUT)).min() >= 0.9999
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert "empty text" in reasons[len(HELD_OUT)] and "limit of 256 tokens" in reasons[len(HELD_OUT) + 1]
