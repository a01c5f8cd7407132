"""contamination of a pack folder: the training rows it holds are gathered by streaming (issue 13), the
same rows as a whole-table reference, also with the packed ids' set spilled to disk."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline import budget
from pipeline.config import MixConfig, PackConfig, TokenizerConfig
from pipeline.stages import contamination, mix, pack, tokenize


def _reference(pack_dir, tok_dir) -> pa.Table:
    ids: set[str] = set()
    for f in sorted(pack_dir.glob("shard-*.arrow")):
        with pa.memory_map(str(f)) as m, ipc.open_file(m) as r:
            ids.update(r.read_all().column("sample_ids").combine_chunks().flatten().to_pylist())
    t = pq.read_table(tok_dir / "tokenized.parquet")
    return t.filter(pa.array([i in ids for i in t.column("id").to_pylist()]))


def test_packed_rows_stream_with_the_ids_spilled(tmp_path, monkeypatch):
    rows = [{"id": f"r{i}", "instruction": f"question {i} " * (1 + i % 7 + 60 * (i % 5 == 0)), "response": f"answer {i} " * (2 + i % 30),
             "condition": "direct", "source": "s", "domain": "general"} for i in range(1_500)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet", row_group_size=400)
    tokenize.run(tmp_path / "rows.parquet", tmp_path / "tok", TokenizerConfig(vocab_size=300, sample_rows=500),
                 conditions=["direct"], seed=1, progress=False)
    mix.run(tmp_path / "tok", tmp_path / "mix", MixConfig(epochs=1), rules=[], seed=2, progress=False)
    # long responses do not fit a 64-token sequence: not every row is packed
    pack.run(tmp_path / "tok", tmp_path / "mix", tmp_path / "pack", PackConfig(seq_len=64, shard_tokens=64 * 200),
             progress=False)
    ref = _reference(tmp_path / "pack", tmp_path / "tok")
    assert 0 < ref.num_rows < 1_500
    dest, tok_dir = contamination._packed_rows(tmp_path / "pack", tmp_path / "a")
    assert tok_dir == tmp_path / "tok" and pq.read_table(dest).equals(ref)
    monkeypatch.setattr(budget, "id_set_bytes", lambda memory_gb: 16 * 64)  # spills every 64 ids
    dest2, _ = contamination._packed_rows(tmp_path / "pack", tmp_path / "b")
    assert pq.read_table(dest2).equals(ref) and dest2.read_bytes() == dest.read_bytes()
    assert [p.name for p in dest2.parent.iterdir()] == [dest2.name]  # the spilled runs removed
