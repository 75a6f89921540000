"""The stored form of a state record and of a document: names, encoding, parsing.

Shared by every store (``JsonFileStore``, ``MemoryStore``, ``PostgresStore``), so each holds
the same bytes and refuses the same records. Encoding checks once that a record would load
back (see ``encode_state``); parsing validates what was read against the schema.

Names follow one rule, ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}``, for agents and documents alike:
they become file names, so nothing else may pass.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from supervisor.errors import StateCorruptError, StateError, StateWriteError
from supervisor.state.base import STATE_FORMAT_VERSION, AgentState

__all__ = [
    "FLOAT_FIELDS",
    "NAME",
    "Unparseable",
    "check_agent_name",
    "check_doc_name",
    "decode_doc",
    "decode_state",
    "doc_subject",
    "encode_doc",
    "encode_state",
    "parse_doc",
    "parse_state",
]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DUMP_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE


def check_agent_name(agent: str) -> str:
    """Return ``agent`` if it is safe as a file name; raise ``StateError`` if it is not."""
    if not NAME.fullmatch(agent):
        raise StateError(
            agent,
            "invalid agent name: use 1-128 of A-Z a-z 0-9 _ . - , starting with a letter or digit",
        )
    return agent


def doc_subject(name: str) -> str:
    """How errors about the document ``name`` identify it (``StateError`` names a subject)."""
    return f"doc:{name}"


def check_doc_name(name: str) -> str:
    """Return ``name`` if it is a safe document name; raise ``StateError`` if it is not."""
    if not NAME.fullmatch(name):
        raise StateError(
            doc_subject(name),
            "invalid document name: use 1-128 of A-Z a-z 0-9 _ . - , "
            "starting with a letter or digit",
        )
    return name


def encode_doc(name: str, doc: dict[str, Any]) -> bytes:
    """Serialise the document ``doc`` to the bytes of its file.

    Raises ``StateError`` for an unsafe name and ``StateWriteError`` when ``doc`` is not a
    dict or would not load back as written (a NaN or infinity, an int beyond 64 bits, a
    non-string key, an object JSON cannot hold).
    """
    subject = doc_subject(check_doc_name(name))
    if not isinstance(doc, dict):
        raise StateWriteError(subject, f"a document must be a dict, got {type(doc).__name__}")
    problem = _non_finite(doc, "")
    if problem is not None:
        # orjson writes NaN as null: the document would come back changed.
        raise StateWriteError(subject, f"document would not load back: {problem} is not finite")
    try:
        return orjson.dumps(doc, option=_DUMP_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise StateWriteError(subject, f"document is not JSON-serialisable: {exc}") from exc


def decode_doc(name: str, raw: bytes, where: str) -> dict[str, Any]:
    """Parse the stored bytes of the document ``name``.

    Raises ``StateCorruptError`` naming ``where`` when ``raw`` is not a JSON object.
    """
    try:
        return parse_doc(raw)
    except Unparseable as exc:
        raise StateCorruptError(doc_subject(name), f"{where}: {exc}") from exc.__cause__


def _non_finite(value: Any, where: str) -> str | None:
    """The path of the first NaN or infinity inside ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "<root>")
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _float_fields(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Paths of the typed ``float`` fields of ``model`` and its sub-models (``*``: each item)."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        for kind in typing.get_args(annotation) if union else (annotation,):
            item_prefix = (*prefix, name)
            if typing.get_origin(kind) is list:
                (kind,) = typing.get_args(kind)
                item_prefix = (*item_prefix, "*")
            if kind is float:
                yield item_prefix
            elif isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _float_fields(kind, item_prefix)


#: where a NaN or infinity in a dumped state would come back as an invalid ``null``
FLOAT_FIELDS = tuple(_float_fields(AgentState))


def _at(document: Any, path: tuple[str, ...]) -> Iterator[Any]:
    if not path:
        yield document
    elif path[0] == "*":
        for item in document if isinstance(document, list) else ():
            yield from _at(item, path[1:])
    elif isinstance(document, dict) and document.get(path[0]) is not None:
        yield from _at(document[path[0]], path[1:])


def _would_not_load_back(document: dict[str, Any]) -> str | None:
    """Why a dumped state would fail ``decode_state``, or None.

    ``model_dump(warnings="error")`` already refuses a field holding the wrong type and
    orjson an object it cannot encode; what both let through is a NaN or infinity in a typed
    float field (written as ``null``) and a format version this supervisor does not read.
    """
    version = document.get("version")
    if isinstance(version, int) and version > STATE_FORMAT_VERSION:
        return f"state format version {version} is newer than this supervisor reads"
    for path in FLOAT_FIELDS:
        for value in _at(document, path):
            if isinstance(value, float) and not math.isfinite(value):
                return f"{'.'.join(path)}: {value} is not a finite number"
    return None


def encode_state(state: AgentState) -> bytes:
    """Serialise ``state`` to the bytes of its state file.

    Raises ``StateError`` for an unsafe agent name and ``StateWriteError`` when the state
    cannot be serialised or would not load back (a NaN where a number must be, an object in
    ``data``, a field assigned the wrong type): a record we could not read is never written.
    """
    agent = check_agent_name(state.agent)
    try:
        document = state.model_dump(mode="json", warnings="error")
        raw = orjson.dumps(document, option=_DUMP_OPTIONS)
    except (PydanticSerializationError, orjson.JSONEncodeError) as exc:
        raise StateWriteError(agent, f"state is not JSON-serialisable: {exc}") from exc
    problem = _would_not_load_back(document)
    if problem is not None:
        raise StateWriteError(agent, f"state would not load back: {problem}")
    return raw


def decode_state(agent: str, raw: bytes, where: str) -> AgentState:
    """Parse the stored bytes of ``agent``'s state.

    Raises ``StateCorruptError`` naming ``where`` when ``raw`` is not valid JSON, does not
    match the schema, or belongs to another agent.
    """
    try:
        return parse_state(agent, raw)
    except Unparseable as exc:
        raise StateCorruptError(agent, f"{where}: {exc}") from exc.__cause__


class Unparseable(Exception):
    """Stored bytes that are not a valid record of the agent; the message says why."""


def parse_state(agent: str, raw: bytes) -> AgentState:
    """The record ``raw`` holds for ``agent``. Raises ``Unparseable`` saying why not."""
    if not raw.strip():
        raise Unparseable(f"file is empty ({len(raw)} bytes)")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Unparseable(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    version = document.get("version") if isinstance(document, dict) else None
    # bool is an int; a newer format must not be half-understood and later overwritten.
    if isinstance(version, int) and not isinstance(version, bool):
        if version > STATE_FORMAT_VERSION:
            raise Unparseable(
                f"state format version {version} is newer than this supervisor reads "
                f"({STATE_FORMAT_VERSION})"
            )
    try:
        state = AgentState.model_validate(document)
    except ValidationError as exc:
        raise Unparseable(f"does not match the state schema: {_summarise(exc)}") from exc
    if state.agent != agent:
        raise Unparseable(f"holds the state of agent {state.agent!r}, not {agent!r}")
    return state


def parse_doc(raw: bytes) -> dict[str, Any]:
    """The document ``raw`` holds. Raises ``Unparseable`` saying why not."""
    if not raw.strip():
        raise Unparseable(f"file is empty ({len(raw)} bytes)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Unparseable(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    if not isinstance(doc, dict):
        raise Unparseable(f"a document must be a JSON object, not {type(doc).__name__}")
    return doc


def _summarise(exc: ValidationError, limit: int = 5) -> str:
    errors = exc.errors(include_url=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors]
    more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more
