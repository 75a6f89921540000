"""yamlsrc: YAML parsed with the line of every key path, duplicates and merge keys refused."""

from __future__ import annotations

import textwrap

import pytest

from supervisor import yamlsrc
from supervisor.yamlsrc import YamlSyntaxError, format_path, load_yaml

DOC = textwrap.dedent(
    """\
    # a comment first
    state_dir: /srv/state
    metrics:
      listen: 127.0.0.1:9464
    agents:
      - name: a
        schedule:
          cron: "* * * * *"
      - name: b
        params: {hosts: [x, y]}
    """
)


@pytest.mark.parametrize(
    ("path", "line"),
    [
        pytest.param((), 2, id="root-is-first-content-line"),
        pytest.param(("state_dir",), 2, id="top-level-key"),
        pytest.param(("metrics", "listen"), 4, id="nested-key"),
        pytest.param(("agents", 0), 6, id="list-item"),
        pytest.param(("agents", 0, "schedule", "cron"), 8, id="deep-key"),
        pytest.param(("agents", 1, "params", "hosts", 1), 10, id="flow-collection-item"),
    ],
)
def test_line_map(path: tuple[str | int, ...], line: int) -> None:
    """Every key and list item is mapped to its 1-based line."""
    assert load_yaml(DOC).lines[path] == line


@pytest.mark.parametrize(
    ("path", "line"),
    [
        pytest.param(("metrics", "enabled"), 3, id="missing-key-uses-parent"),
        pytest.param(("agents", 1, "schedule", "every"), 9, id="missing-subtree-uses-item"),
        pytest.param(("nowhere",), 2, id="unknown-top-level-uses-root"),
    ],
)
def test_line_of_falls_back_to_nearest_ancestor(path: tuple[str | int, ...], line: int) -> None:
    """line_of a path absent from the file is the line of its nearest present ancestor."""
    assert load_yaml(DOC).line_of(path) == line


def test_data_is_plain_python() -> None:
    """The data is built with the safe constructor: dicts, lists and scalars."""
    data = load_yaml(DOC).data
    assert data["agents"][1] == {"name": "b", "params": {"hosts": ["x", "y"]}}
    assert load_yaml("n: 3\nf: 1.5\nb: true\nz: null\n").data == {
        "n": 3,
        "f": 1.5,
        "b": True,
        "z": None,
    }


@pytest.mark.parametrize("text", ["", "# only a comment\n"], ids=["empty", "comment-only"])
def test_empty_document_is_an_empty_mapping(text: str) -> None:
    """A document with no content parses to {} with no lines."""
    doc = load_yaml(text)
    assert (doc.data, doc.lines, doc.duplicates) == ({}, {}, [])


def test_non_string_keys_become_strings() -> None:
    """An int key is kept as its string form, so it can be reported as a key path."""
    assert load_yaml("1: one\n").data == {"1": "one"}


@pytest.mark.parametrize(
    ("text", "duplicates", "value"),
    [
        pytest.param("a: 1\nb: 2\na: 3\n", [(("a",), 3)], {"a": 3, "b": 2}, id="top-level"),
        pytest.param(
            "x:\n  y: 1\n  y: 2\n", [(("x", "y"), 3)], {"x": {"y": 2}}, id="nested-last-wins"
        ),
        pytest.param(
            "l:\n  - k: 1\n    k: 2\n", [(("l", 0, "k"), 3)], {"l": [{"k": 2}]}, id="in-list-item"
        ),
        pytest.param("a: 1\na: 2\na: 3\n", [(("a",), 2), (("a",), 3)], {"a": 3}, id="three-times"),
    ],
)
def test_duplicate_keys_are_recorded(
    text: str, duplicates: list[tuple[tuple[str | int, ...], int]], value: object
) -> None:
    """Each repeated key is listed with its line; the data keeps the last value, like PyYAML."""
    doc = load_yaml(text)
    assert doc.duplicates == duplicates
    assert doc.data == value


def test_duplicate_key_line_map_points_at_the_value_used() -> None:
    """After a duplicate, the line map points at the occurrence whose value was kept."""
    assert load_yaml("a: 1\nb: 2\na: 3\n").lines[("a",)] == 3


@pytest.mark.parametrize(
    ("text", "line", "phrase"),
    [
        pytest.param("a: [1, 2\nb: 3\n", 2, "did not find expected ',' or ']'", id="unclosed-flow"),
        pytest.param("a:\n\tb: 1\n", 2, "cannot start any token", id="tab-indent"),
        pytest.param("a:\n    b: 1\n  c: 2\n", 3, "did not find expected key", id="bad-dedent"),
        pytest.param("a: 'open\n", 2, "found unexpected end of stream", id="unclosed-quote"),
        pytest.param("a: 1\n---\nb: 2\n", 2, "but found another document", id="two-documents"),
        pytest.param("a: *nowhere\n", 1, "found undefined alias", id="undefined-alias"),
        pytest.param(
            "a: !!python/object:os.system x\n",
            1,
            "could not determine a constructor",
            id="unsafe-tag",
        ),
    ],
)
def test_syntax_errors_carry_the_line(text: str, line: int, phrase: str) -> None:
    """Invalid YAML raises YamlSyntaxError with the 1-based line of the problem."""
    with pytest.raises(YamlSyntaxError, match=r"^invalid YAML: ") as info:
        load_yaml(text)
    assert info.value.line == line
    assert phrase in str(info.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("base: &b {x: 1}\nother:\n  <<: *b\n", 3, id="alias"),
        pytest.param("other:\n  y: 2\n  <<: {x: 1}\n", 3, id="inline-mapping"),
    ],
)
def test_merge_keys_are_rejected(text: str, line: int) -> None:
    """A merge key (<<) is refused with its line rather than silently merged."""
    with pytest.raises(YamlSyntaxError, match="merge keys") as info:
        load_yaml(text)
    assert info.value.line == line


def test_plain_aliases_are_expanded() -> None:
    """An alias that is not a merge key is an ordinary copy of the anchored value."""
    assert load_yaml("a: &x [1, 2]\nb: *x\n").data == {"a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("a: &x [*x]\n", 1, id="sequence-in-itself"),
        # reported at the anchor: the composer hands back the anchored node itself
        pytest.param("a: 1\nb: &m\n  c: *m\n", 2, id="mapping-in-itself"),
    ],
)
def test_recursive_alias_is_a_syntax_error(text: str, line: int) -> None:
    """An anchor used inside itself is refused instead of recursing forever."""
    with pytest.raises(YamlSyntaxError, match="recursive aliases") as info:
        load_yaml(text)
    assert info.value.line == line


def test_parsing_does_not_accumulate_nodes() -> None:
    """Repeated loads (SIGHUP reloads) leave the shared constructor's cache empty."""
    for _ in range(3):
        load_yaml(DOC)
    assert yamlsrc._constructor.constructed_objects == {}


@pytest.mark.parametrize(
    ("path", "text"),
    [
        pytest.param((), "", id="root"),
        pytest.param(("state_dir",), "state_dir", id="top-level"),
        pytest.param(("metrics", "listen"), "metrics.listen", id="nested"),
        pytest.param(("agents", 2, "schedule"), "agents[2].schedule", id="list-index"),
        pytest.param(("a", 0, 1, "b"), "a[0][1].b", id="nested-lists"),
        pytest.param((0, "x"), "[0].x", id="leading-index"),
    ],
)
def test_format_path(path: tuple[str | int, ...], text: str) -> None:
    """Key paths render as an operator reads them: dots for keys, brackets for indexes."""
    assert format_path(path) == text
