"""The memory budget of the streaming stages (`resources.memory_gb` in a spec, default 4): the sizes of
the blocks and batches the stages read, hash and write at a time are derived from it, so that a
stage's peak RSS stays within the budget whatever the row count.

The shares are rough: a batch of rows costs its Arrow bytes a few times over while it is parsed,
filtered and written (the parsed block, the filtered copy, the Parquet encoder's buffers), and the
interpreter with pyarrow, polars and numpy loaded is about 150 MB before any row is read.
"""

from __future__ import annotations

DEFAULT_GB = 4.0
BASE_MB = 150  # the interpreter and its libraries
JSONL_SHARE = 1 / 24  # of the budget (less BASE_MB): the bytes of one JSONL block
BATCH_SHARE = 1 / 16  # of the budget: the Arrow bytes of one batch of rows
MIN_BLOCK, MAX_BLOCK = 1 << 20, 64 << 20
MIN_ROWS, MAX_ROWS = 1024, 1 << 20
LINEAGE_SHARE = 1 / 64  # of the budget: one bucket of lineage's out-of-core join, or one batch of its rows


def usable_bytes(memory_gb: float | None) -> int:
    gb = DEFAULT_GB if memory_gb is None else float(memory_gb)
    return max(16 << 20, int(gb * 2**30) - BASE_MB * 2**20)


def block_bytes(memory_gb: float | None) -> int:
    """Bytes of JSONL lines parsed at once."""
    return int(min(MAX_BLOCK, max(MIN_BLOCK, usable_bytes(memory_gb) * JSONL_SHARE)))


def batch_rows(memory_gb: float | None, row_bytes: float = 1024, multiple: int = 1) -> int:
    """Rows of a batch of rows of about `row_bytes` each, rounded down to a multiple of `multiple`
    (a Parquet row group, so that batches written one by one make the same row groups)."""
    rows = int(usable_bytes(memory_gb) * BATCH_SHARE / max(1.0, row_bytes))
    rows = min(MAX_ROWS, max(MIN_ROWS, rows))
    return max(multiple, rows // multiple * multiple)
ID_SET_SHARE = 1 / 512  # of the budget: the ids an id set holds in memory before it spills them (rows._IdSet)
MIN_ID_SET, MAX_ID_SET = 1 << 20, 64 << 20
MAX_JOIN_PARTS = 4096  # partitions or ranges of one out-of-core join at most
JOIN_SHARE = 1 / 64  # of the budget: one partition of an out-of-core join, or one range of its results (mix, pack)
MIN_JOIN_PART = 8 << 20  # bytes: the smallest such partition (fewer, larger ones under a low budget)


def id_set_bytes(memory_gb: float | None) -> int:
    """Bytes of ids (16 each) an id set holds in memory before it spills them to sorted run files (it
    peaks at about 3x that while merging, plus ~1.5 bytes an id of Bloom filters for the spilled ones)."""
    return int(min(MAX_ID_SET, max(MIN_ID_SET, usable_bytes(memory_gb) * ID_SET_SHARE)))


def join_parts(items: int, memory_gb: float | None, item_bytes: int) -> int:
    """Partitions (or ranges) of `items` things of `item_bytes` each so that one fits in JOIN_SHARE of
    the budget (at least MIN_JOIN_PART bytes a part, at most MAX_JOIN_PARTS parts): mix's and pack's
    out-of-core joins."""
    part = max(MIN_JOIN_PART, int(usable_bytes(memory_gb) * JOIN_SHARE))
    return int(min(MAX_JOIN_PARTS, max(1, -(-items * item_bytes // part))))
