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
        pa.field("condition", pa.string(), nullable=False),  # tag list, e.g. "cot" / "synth,cot"
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


# A row's `condition` is a comma-separated list of condition tags ("cot", "synth,cot",
# "synth,noisy,cot"), as in the reference data (data_io), whose tokenizer puts one condition token per
# tag after BOQ in the order the row gives. We keep the given order (no canonical sort): "synth,cot" and
# "cot,synth" are different prompts, exactly as in the reference; the spec and the evaluation name tags
# in the reference's order (synth, noisy, then cot/direct).
CONDITION_SEP = ","


def parse_condition(value: str) -> tuple[str, ...]:
    """The tags of a condition string, in the given order: "synth, cot" -> ("synth", "cot").

    Spaces around a tag are dropped; an empty tag ("cot,", ",") or a repeated tag is a ValueError
    naming the condition. Whether each tag is a known condition is the caller's check
    (`check_condition`)."""
    if not isinstance(value, str):
        raise ValueError(f"condition must be a string of comma-separated tags, got {type(value).__name__}")
    tags = tuple(t.strip() for t in value.split(CONDITION_SEP))
    if any(not t for t in tags):
        raise ValueError(f"condition {value!r} has an empty tag (tags are comma-separated, e.g. 'synth,cot')")
    dup = sorted({t for t in tags if tags.count(t) > 1})
    if dup:
        raise ValueError(f"condition {value!r} repeats tag(s) {dup}")
    return tags


def check_condition(value: str, known) -> str:
    """The condition in its stored form ("synth,cot": tags joined by ',' without spaces), after checking
    that every tag is one of `known`; ValueError naming the unknown tags otherwise."""
    tags = parse_condition(value)
    unknown = [t for t in tags if t not in known]
    if unknown:
        raise ValueError(f"condition {value!r}: unknown tag(s) {unknown}; known tags: {list(known)}")
    return CONDITION_SEP.join(tags)


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
