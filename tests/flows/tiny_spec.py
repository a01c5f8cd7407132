"""Shared spec for the flow tests (a plain module: `conftest` names several files, so it cannot be imported)."""

# A tiny generator-only spec (300 word problems with planted duplicates) for flow tests that need a
# real run in seconds.
TINY = """
name: tiny
seed: 1
sources:
  - name: wp
    kind: generator
    generator: word_problems
    params: {n: 300, near_dup_rate: 0.1, exact_dup_rate: 0.03}
    fields: {instruction: question, response: answer, id: uid, condition: condition, subset: task}
tokenizer: {vocab_size: 400, sample_rows: 1000}
pack: {seq_len: 256, shard_tokens: 16384}
"""
