from __future__ import annotations

import textwrap

import pytest

from pipeline.spec import SpecError, load_spec


def write(tmp_path, text: str):
    p = tmp_path / "spec.yaml"
    p.write_text(textwrap.dedent(text))
    return p


GOOD = """
name: t
sources:
  - name: a
    kind: generator
    generator: arithmetic
    params: {n: 10}
"""


def test_bundled_specs_load():
    demo = load_spec("demo")
    assert demo.name == "demo" and len(demo.sources) >= 5
    assert any(r.cap_rows for r in demo.stratify.rules) and any(r.repeat > 1 for r in demo.stratify.rules)
    big = load_spec("hrm_text_1b")
    names = {s.name for s in big.sources}
    for expected in ["flan", "tasksource", "no_robots", "synth", "platypus", "openmathinstruct2", "numinamath",
                     "omni_math", "gsm8k", "math", "sudoku_extreme", "openthoughts2"]:
        assert expected in names
    caps = {r.match: r for r in big.stratify.rules}
    assert caps["synth/"].cap_rows == 20000 and caps["flan/"].cap_rows == 5000
    assert caps["openmathinstruct2/"].cap_rows == 2_000_000
    for m in ["platypus/", "omni_math/", "gsm8k/", "math/", "no_robots/"]:
        assert caps[m].repeat == 10
    assert all(s.kind == "hub" and s.estimate is not None for s in big.sources)


def test_good_minimal(tmp_path):
    s = load_spec(write(tmp_path, GOOD))
    assert s.sources[0].fields.instruction == "instruction" and s.dedup.threshold == 0.8


@pytest.mark.parametrize(
    "patch, expect",
    [
        (("kind: generator", "kind: hubb"), "sources[0].kind"),
        (("params: {n: 10}", "params: {n: 10}\n    colour: red"), "sources[0].colour: unknown field"),
        (("kind: generator\n    generator: arithmetic\n    params: {n: 10}", "kind: local"), "needs 'path'"),
        (("name: t", "name: t\ndedup: {threshold: 1.5}"), "dedup.threshold"),
        (("name: t", "name: t\ndedup: {num_perm: many}"), "dedup.num_perm"),
        (("name: t", "name: t\nstratify: {rules: [{match: a/, ratio: 0.7}, {match: b/, ratio: 0.6}]}"),
         "ratios add up to 1.3"),
        (("params: {n: 10}", "params: {n: 10}\n    condition: sarcastic"), "condition 'sarcastic'"),
        (("name: t", "name: t\ntokenizer: {kind: pretrained}"), "needs 'name'"),
        (("name: a\n", "name: a b\n"), "sources[0].name"),
    ],
)
def test_errors_name_file_and_field(tmp_path, patch, expect):
    text = textwrap.dedent(GOOD).replace(*patch)
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert str(p) in msg and expect in msg, msg


def test_duplicate_source_names(tmp_path):
    text = textwrap.dedent(GOOD) + "  - {name: a, kind: generator, generator: sequences, params: {n: 1}}\n"
    with pytest.raises(SpecError, match="names must be unique"):
        load_spec(write(tmp_path, text))


def test_not_yaml_and_not_mapping(tmp_path):
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(SpecError, match="YAML mapping"):
        load_spec(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(SpecError, match="no such spec"):
        load_spec(tmp_path / "nope.yaml")
