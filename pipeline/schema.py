"""The row schemas that pass between the data stages.

Every stage reads and writes Parquet files of one of these schemas, so any stage can also run
alone on a user's files (JSONL or Parquet with these columns).
"""

from __future__ import annotations

import pyarrow as pa

# normalize -> the one schema every source is mapped to.
NORMALIZED_FIELDS: tuple[str, ...] = ("id", "instruction", "response", "condition", "source", "domain")
NORMALIZED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # stable: "<source>/<source row id or index>"
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("condition", pa.string(), nullable=False),  # e.g. direct / cot
        pa.field("source", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
    ]
)

# normalize also keeps where the row came from (file / stratum hint) for stratify.
NORMALIZED_EXTRA = pa.schema(
    [
        pa.field("origin", pa.string(), nullable=False),  # "<source>/<file or subset or task>"
    ]
)
NORMALIZED_FULL_SCHEMA = pa.schema(list(NORMALIZED_SCHEMA) + list(NORMALIZED_EXTRA))

# stratify -> adds the stratum, the matching rule and the source priority (spec order; 0 is highest).
STRATIFIED_SCHEMA = pa.schema(
    list(NORMALIZED_FULL_SCHEMA)
    + [
        pa.field("stratum", pa.string(), nullable=False),
        pa.field("rule", pa.string(), nullable=False),
        pa.field("priority", pa.int32(), nullable=False),
    ]
)

# Rows removed by any stage, with the reason: rejects (normalize), duplicates (dedup), short (pack) ...
REMOVAL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=True),
        pa.field("duplicate_of", pa.string(), nullable=True),
    ]
)


def empty_table(schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([], schema=schema)


def check_columns(table: pa.Table, required: tuple[str, ...] | list[str], where: str) -> None:
    """Raise a clear error naming the missing columns (not a KeyError deep inside a stage)."""
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; expected at least {list(required)}, "
            f"found {table.column_names}"
        )
