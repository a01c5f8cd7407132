"""Typed configuration of every data stage, and the run spec that holds them (data_specs/*.yaml).

One source of truth: each stage takes its own config object; `RunSpec` composes them. Unknown fields
are errors (`extra="forbid"`), so a typo in a spec never silently falls back to a default.
Use `pipeline.spec.load_spec(path)` to load a YAML file with errors that name the file and field.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .schema import CONDITION_SEP, check_condition

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------
# ingest + normalize
# ----------------------------------------------------------------------------------------------
class FieldMap(Strict):
    """How a source's fields map to the normalized schema.

    `instruction` / `response` are a field name, or a template with `{field}` placeholders
    (anything containing '{' is a template; write '{{' for a literal brace). The others name a field
    of the source row, or are left out."""

    instruction: str = "instruction"
    response: str = "response"
    id: str | None = None  # field with the source's own row id; default: the row index
    condition: str | None = None  # field with a per-row condition (tag list); default: the source's condition
    domain: str | None = None  # field with a per-row domain; default: the source's domain
    subset: str | None = None  # field naming the row's subset/task (its stratum key), e.g. FLAN task


class SourceEstimate(Strict):
    """Size hints for `hrm plan` (a dry run that downloads nothing): rows, mean tokens per row, and
    how many strata (files/subsets) the rows spread over."""

    rows: int = Field(ge=0)
    tokens_per_row: float = Field(gt=0)
    strata: int = Field(default=1, ge=1)


class SourceSpec(Strict):
    name: str = Field(description="unique source name; prefix of every row id")
    kind: Literal["hub", "local", "generator"]
    # hub: a Hugging Face dataset id; local: a file, folder or glob of .jsonl/.parquet files
    path: str | None = None
    config: str | None = None  # hub config name
    split: str = "train"  # hub split
    revision: str | None = None  # hub revision (commit sha / tag); recorded in the ingest manifest
    generator: str | None = None  # generator: the name of a built-in generator
    params: dict[str, Any] = Field(default_factory=dict)  # generator parameters
    fields: FieldMap = Field(default_factory=FieldMap)
    # condition tags of every row ("cot", "synth,cot", "synth,noisy,cot"): one condition token per tag,
    # in this order (pipeline.schema.parse_condition); each tag must be in normalize.conditions
    condition: str = "direct"
    # what normalize emits per source row (data_io's cot/direct pairs): "cot" the row as given (its whole
    # response; the default), "direct" the row with only its final answer as response (same id), "both"
    # the row and a direct copy of it with id "<id>#direct". A direct row's condition swaps the tag "cot"
    # for "direct", keeping the others ("synth,cot" -> "synth,direct"), or adds "direct" when the row
    # has no "cot" tag. A row whose answer cannot be found is rejected ("no_final_answer"), never dropped.
    emit: Literal["cot", "direct", "both"] = "cot"
    # where the final answer is: "hash" the text after the last "####" (GSM8K), "boxed" the content of
    # the last \boxed{...} (MATH: nested braces, also "\boxed 5" and \fbox), "auto" "####" when the
    # response has it, else \boxed
    answer_format: Literal["auto", "hash", "boxed"] = "auto"
    domain: str = "general"
    license: str | None = None
    max_rows: int | None = Field(default=None, ge=1)  # take at most this many rows (in source order)
    # rows whose field holds one of the listed values are removed (counted, reason "excluded_by_spec")
    exclude: dict[str, list[Any]] = Field(default_factory=dict)
    estimate: SourceEstimate | None = None  # size hints for the dry run
    # hub only: ingest adds a column of this name holding each row's data file (its path inside the
    # dataset, e.g. "synth_001.parquet"); name it in `fields.subset` to make each data file a stratum
    # (the paper caps SYNTH per file). Needs Parquet data files (their row counts are read from metadata).
    data_file_field: str | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.match(v) or "/" in v:
            raise ValueError(f"source name {v!r} must match {NAME_RE.pattern} (it prefixes row ids)")
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> "SourceSpec":
        if self.kind in ("hub", "local") and not self.path:
            raise ValueError(f"source '{self.name}': kind '{self.kind}' needs 'path'")
        if self.kind == "generator" and not self.generator:
            raise ValueError(f"source '{self.name}': kind 'generator' needs 'generator' (a built-in name)")
        if self.data_file_field is not None and self.kind != "hub":
            raise ValueError(f"source '{self.name}': 'data_file_field' only applies to kind 'hub' "
                             "(local sources already use the file name as origin)")
        if self.kind != "generator" and (self.generator or self.params):
            raise ValueError(f"source '{self.name}': 'generator'/'params' only apply to kind 'generator'")
        return self


class NormalizeConfig(Strict):
    max_instruction_chars: int = Field(default=100_000, ge=1)
    max_response_chars: int = Field(default=100_000, ge=1)
    # the condition tags (one special token each); the reference's four: direct, cot, noisy, synth
    conditions: list[str] = Field(default_factory=lambda: ["direct", "cot", "noisy", "synth"])
    strip: bool = True  # strip surrounding whitespace from instruction and response

    @field_validator("conditions")
    @classmethod
    def _tags_ok(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if not c or CONDITION_SEP in c or c != c.strip()]
        if bad:
            raise ValueError(f"conditions are single tags (no '{CONDITION_SEP}', no spaces at the ends): {bad}")
        return v


# ----------------------------------------------------------------------------------------------
# stratify + mix
# ----------------------------------------------------------------------------------------------
class StratumRule(Strict):
    """First-match rule (the paper's prefix_config). `match` is a prefix of the row's origin key
    ("<source>/<file or subset>"), or '*' for every row. The rule sets the stratum granularity, the
    domain, and the stratum's cap, repeat factor and target ratio used by `mix`."""

    match: str
    name: str | None = None  # default: the match string
    stratum: Literal["origin", "source", "rule"] = "origin"  # each file/task | each source | one per rule
    domain: str | None = None  # overrides the row's domain
    cap_rows: int | None = Field(default=None, ge=1)  # per stratum, per epoch
    cap_tokens: int | None = Field(default=None, ge=1)  # per stratum, per epoch
    repeat: float = Field(default=1.0, gt=0)  # upsampling factor per epoch (x10 for small HQ sets)
    ratio: float | None = Field(default=None, gt=0, le=1)  # target share of seen tokens

    @property
    def label(self) -> str:
        return self.name or self.match


class StratifyConfig(Strict):
    rules: list[StratumRule] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _unique(cls, v: list[StratumRule]) -> list[StratumRule]:
        labels = [r.label for r in v]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"rule names must be unique, repeated: {sorted(dup)}")
        return v


class MixConfig(Strict):
    epochs: int = Field(default=1, ge=1)
    token_budget: int | None = Field(default=None, ge=1)  # target seen tokens over all epochs
    seed: int | None = None  # default: the spec's seed
    # the most times a stratum's rows may be seen per epoch window once a budget/ratio rescales its
    # repeat (None: no limit); an unreachable ratio or budget fails early instead of repeating wildly
    max_repeat: float | None = Field(default=50.0, gt=0)


# ----------------------------------------------------------------------------------------------
# dedup
# ----------------------------------------------------------------------------------------------
class DedupConfig(Strict):
    exact: bool = True
    near: bool = True
    ngram: int = Field(default=5, ge=1)  # word n-gram shingles
    num_perm: int = Field(default=128, ge=16, le=1024)
    threshold: float = Field(default=0.8, gt=0, lt=1)  # Jaccard similarity
    # how a candidate pair is verified: "exact" = exact Jaccard of the shingle sets >= threshold;
    # "estimate" = MinHash estimate >= threshold - 2 standard errors (looser: no second read of the
    # texts, but pairs below the threshold get through; see pipeline/stages/dedup.py)
    verify: Literal["exact", "estimate"] = "exact"
    bands: int | None = Field(default=None, ge=1)  # LSH bands; default: chosen from threshold
    seed: int = 1
    lowercase: bool = True
    workers: int = Field(default=1, ge=1)  # processes for the signature step


# ----------------------------------------------------------------------------------------------
# tokenizer + pack
# ----------------------------------------------------------------------------------------------
class TokenizerConfig(Strict):
    kind: Literal["train", "pretrained"] = "train"
    vocab_size: int = Field(default=8192, ge=300)
    min_frequency: int = Field(default=2, ge=1)
    sample_rows: int = Field(default=200_000, ge=1)  # rows sampled (seeded) to train on
    name: str | None = None  # pretrained: a Hub tokenizer name or a local tokenizer.json
    # every digit its own pre-token (the reference tokenizer splits one per number character), so BPE
    # never merges digit runs; saved in tokenizer.json, so every later load encodes numbers the same way
    split_digits: bool = True  # as the reference; false keeps BPE digit runs (for comparison)

    @model_validator(mode="after")
    def _pretrained_name(self) -> "TokenizerConfig":
        if self.kind == "pretrained" and not self.name:
            raise ValueError("tokenizer kind 'pretrained' needs 'name'")
        return self


class PackConfig(Strict):
    seq_len: int = Field(default=1024, ge=16)
    # response text tokens (EOA excluded) a row needs; 1 = one content token + EOA, as the reference
    min_response_tokens: int = Field(default=1, ge=1)
    shard_tokens: int = Field(default=1 << 22, ge=1024)  # tokens per Arrow shard (about)
    open_bins: int = Field(default=32, ge=1)  # first-fit packing: sequences kept open at once


# ----------------------------------------------------------------------------------------------
# the run spec
# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# contamination
# ----------------------------------------------------------------------------------------------
class ContaminationConfig(Strict):
    # words: normalised-text word n-grams (GPT-3 / OLMo style, independent of the tokenizer's boundaries),
    # with the short-item rule; tokens: the paper's Llama-2 check over the pipeline's BPE token ids
    method: Literal["words", "tokens"] = "words"
    ngram_sizes: tuple[int, ...] = (13, 8)
    primary_n: int = 13  # the n whose coverage gives the item's bucket (and drives decontamination)
    min_ngram: int = Field(default=8, ge=1)  # words: the smallest window of the short-item rule
    clean_below: float = Field(default=0.2, gt=0, lt=1)
    not_clean_below: float = Field(default=0.5, gt=0, lt=1)
    dirty_at: float = Field(default=0.8, gt=0, le=1)
    benchmarks: tuple[str, ...] | None = None  # names to check (default: every folder found)
    splits: dict[str, str] = Field(default_factory=dict)  # name -> split, overrides DEFAULT_SPLITS
    max_rows_per_ngram: int = Field(default=32, ge=1)  # training rows remembered per matched n-gram
    top_rows: int = Field(default=5, ge=1)  # rows listed per dirty item
    batch_rows: int = Field(default=32768, ge=1)  # training rows hashed per batch
    decontaminate: bool = False
    # the lowest bucket whose responsible rows decontamination drops (dirty: as Llama-2 reports)
    decontaminate_at: Literal["not_clean", "not_dirty", "dirty"] = "dirty"

    @model_validator(mode="after")
    def _check(self) -> "ContaminationConfig":
        if not self.ngram_sizes or any(n < 2 for n in self.ngram_sizes):
            raise ValueError(f"contamination.ngram_sizes must be sizes >= 2, got {self.ngram_sizes}")
        if self.primary_n not in self.ngram_sizes:
            raise ValueError(f"contamination.primary_n {self.primary_n} is not in ngram_sizes {self.ngram_sizes}")
        if not (self.clean_below <= self.not_clean_below <= self.dirty_at):
            raise ValueError("contamination: need clean_below <= not_clean_below <= dirty_at")
        return self


class ContaminationSpec(ContaminationConfig):
    """The spec's `contamination:` section: the check's settings plus where the benchmarks come from.

    `benchmarks_dir` is a local folder of `<name>/<split>.jsonl` files (Hub field layouts); with `hub:
    true` and no folder the benchmarks are downloaded from the Hugging Face Hub by name. With neither,
    the data flow skips the check and says so. `decontaminate: true` drops the training rows that make
    a benchmark item dirty before mixing and packing; the lineage counts them under
    `contamination:benchmark_contamination`."""

    benchmarks_dir: str | None = None
    hub: bool = False

    @property
    def enabled(self) -> bool:
        return self.benchmarks_dir is not None or self.hub


# ----------------------------------------------------------------------------------------------
# resources
# ----------------------------------------------------------------------------------------------
class ResourcesConfig(Strict):
    """What the data stages may use. `memory_gb`: the budget the streaming stages (ingest, normalize,
    stratify, dedup, tokenizer, mix, pack, lineage) size their batches by (pipeline/budget.py), so that peak
    RSS stays within it whatever the row count. Never part of a stage's fingerprint: it changes how
    much is held at once, never the outputs."""

    memory_gb: float = Field(default=4.0, gt=0)
    # where the stages' parts (a source, a MinHash signature part) run: "local" (this process) or "dask"
    # (tasks on the Dask scheduler at `address`, else a LocalCluster of `workers` processes on 127.0.0.1;
    # flows/dask_runner.py). Never part of a fingerprint: the outputs are the same bytes.
    runner: Literal["local", "dask"] = "local"
    address: str | None = None
    workers: int = Field(default=2, ge=1)


class RunSpec(Strict):
    name: str
    description: str = ""
    seed: int = 1234
    sources: list[SourceSpec]
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    stratify: StratifyConfig = Field(default_factory=StratifyConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    contamination: ContaminationSpec | None = None
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"spec name {v!r} must match {NAME_RE.pattern}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunSpec":
        if not self.sources:
            raise ValueError("sources: at least one source is needed")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: names must be unique, repeated: {dup}")
        for s in self.sources:
            try:
                check_condition(s.condition, self.normalize.conditions)
            except ValueError as e:
                raise ValueError(f"sources: '{s.name}': {e} (normalize.conditions)") from None
            if s.emit != "cot" and "direct" not in self.normalize.conditions:
                raise ValueError(f"sources: '{s.name}' has emit {s.emit!r}, which needs the tag 'direct' in "
                                 f"normalize.conditions {self.normalize.conditions}")
        ratios = [r.ratio for r in self.stratify.rules if r.ratio is not None]
        if sum(ratios) > 1.0 + 1e-9:
            raise ValueError(f"stratify.rules: target ratios add up to {sum(ratios):.4f} > 1")
        return self

    @property
    def mix_seed(self) -> int:
        return self.mix.seed if self.mix.seed is not None else self.seed
