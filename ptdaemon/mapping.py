"""Field mapping, required fields and the text encodings of mapped payloads.

Pure functions: paths into submission data, placeholders, form pairs and CSV.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from typing import Any, Final

import msgspec

from ptdaemon.errors import DeliveryError, InvalidError
from ptdaemon.models import ErrorCategory

PathSpec = str | list[str]

_LIST_INDEX: Final = re.compile(r"[0-9]+")
_PLAIN_NUMBER: Final = re.compile(
    r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?"
)
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")
# Characters that would mean attribute access, indexing, a conversion or a
# format spec in str.format; a placeholder holding them is only a field name
# when the fields really have that key.
_FORMAT_SYNTAX: Final = frozenset(".[]!:")
# Refused when a template is saved; a dot may still be part of a field name.
_SAVE_REFUSED: Final = frozenset("[]!:")


def normalise_key(key: str) -> str:
    return unicodedata.normalize("NFC", key)


def _segments(path: PathSpec) -> list[str]:
    return path.split(".") if isinstance(path, str) else list(path)


def _path_name(path: PathSpec) -> str:
    return path if isinstance(path, str) else ".".join(path)


def _lookup_key(mapping: dict[str, Any], key: str) -> tuple[bool, Any]:
    if key in mapping:
        return True, mapping[key]
    for candidate, value in mapping.items():
        if normalise_key(candidate) == key:
            return True, value

    return False, None


def _step(current: Any, key: str) -> tuple[bool, Any]:
    if isinstance(current, dict):
        return _lookup_key(current, key)
    if isinstance(current, list) and _LIST_INDEX.fullmatch(key):
        index = int(key)
        if index < len(current):
            return True, current[index]

    return False, None


def resolve(data: Any, path: PathSpec) -> tuple[bool, Any]:
    """Walk `path` in `data`; return (found, value)."""
    current = data
    for segment in _segments(path):
        found, current = _step(current, normalise_key(segment))
        if not found:
            return False, None

    return True, current


def map_payload(data: dict[str, Any], field_map: dict[str, PathSpec]) -> dict[str, Any]:
    """Build the outgoing payload: `data` itself, or only the mapped fields."""
    if not field_map:
        return data
    payload: dict[str, Any] = {}
    for name, path in field_map.items():
        found, value = resolve(data, path)
        if found:
            payload[name] = value

    return payload


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | dict):
        return not value

    return False


def missing_required(data: Any, required_fields: list[PathSpec]) -> list[str]:
    """Name the required paths that are missing, null, blank or empty."""
    missing = []
    for path in required_fields:
        found, value = resolve(data, path)
        if not found or _is_blank(value):
            missing.append(_path_name(path))

    return missing


def _check_path(entry: str, path: PathSpec) -> None:
    segments = _segments(path)
    if not segments or any(not segment for segment in segments):
        raise InvalidError(
            f"{entry}: a path must not be empty or have an empty key",
            details={"field": entry},
        )


def check_paths(
    field_map: dict[str, PathSpec], required_fields: list[PathSpec]
) -> None:
    """Raise InvalidError naming the first path with an empty key."""
    for name, path in field_map.items():
        _check_path(f"field_map.{name}", path)
    for index, path in enumerate(required_fields):
        _check_path(f"required_fields[{index}]", path)


def _validation_error(message: str, field: str) -> DeliveryError:
    return DeliveryError(
        message,
        category=ErrorCategory.VALIDATION,
        details={"retryable": False, "exception": "DeliveryError", "field": field},
    )


def scalar_text(value: Any, *, field: str = "value") -> str:
    """Spell a JSON scalar as form fields, CSV cells and placeholders show it."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return json.dumps(value)
    raise _validation_error(f"field {field!r} is not a single value", field)


def _compact_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _cell_text(value: Any) -> str:
    if isinstance(value, dict | list):
        return _compact_json(value)

    return scalar_text(value)


def form_pairs(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """Flatten a payload into form fields: one pair per scalar or list item."""
    pairs = []
    for name, value in payload.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict | list):
                message = f"field {name!r} holds an object, which forms cannot send"
                raise _validation_error(message, name)
            pairs.append((name, scalar_text(item, field=name)))

    return pairs


def _parse_template(text: str) -> Iterator[tuple[bool, str]]:
    """Yield (is_placeholder, text) parts; raise ValueError on bad braces."""
    literal: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        pair = text[index : index + 2]
        if pair in ("{{", "}}"):
            literal.append(char)
            index += 2
        elif char == "}":
            raise ValueError(f"single '}}' at position {index}")
        elif char == "{":
            end = text.find("}", index + 1)
            name = text[index + 1 : end]
            if end < 0 or not name or "{" in name:
                raise ValueError(f"unclosed or empty placeholder at position {index}")
            yield False, "".join(literal)
            literal = []
            yield True, name
            index = end + 1
        else:
            literal.append(char)
            index += 1
    yield False, "".join(literal)


def placeholder_names(text: str) -> list[str]:
    """List the placeholder names in `text`, first occurrence first."""
    try:
        parts = list(_parse_template(text))
    except ValueError as exc:
        raise InvalidError(f"malformed placeholder: {exc}") from exc
    names = [part for is_name, part in parts if is_name]

    return list(dict.fromkeys(names))


def check_template_text(text: str) -> None:
    """Raise InvalidError for malformed braces or a name that is not plain."""
    for name in placeholder_names(text):
        if not name or _SAVE_REFUSED.intersection(name) or "__" in name:
            raise InvalidError(
                f"placeholder {{{name}}}: only plain field names are allowed"
            )


def _placeholder_text(name: str, fields: dict[str, Any]) -> str:
    key = normalise_key(name)
    if key in fields:
        return _cell_text(fields[key])
    if _FORMAT_SYNTAX.intersection(name):
        message = f"placeholder {name!r}: only plain field names are allowed"
        raise _validation_error(message, name)

    raise _validation_error(f"placeholder {name!r} names no field", name)


def render(text: str, fields: dict[str, Any]) -> str:
    """Fill the `{name}` placeholders of `text` from `fields`."""
    normalised = {normalise_key(key): value for key, value in fields.items()}
    out = []
    try:
        for is_name, part in _parse_template(text):
            out.append(_placeholder_text(part, normalised) if is_name else part)
    except ValueError as exc:
        raise _validation_error(f"malformed placeholder: {exc}", "template") from exc

    return "".join(out)


def _neutralised(cell: str) -> str:
    if cell.startswith(_FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(cell):
        return "'" + cell

    return cell


def csv_document(
    payload: dict[str, Any], *, neutralise: bool = True, header: bool = True
) -> str:
    """Write the payload as RFC 4180 CSV: a header row, then one data row."""
    rows = [list(payload), [_cell_text(value) for value in payload.values()]]
    if not header:
        rows = rows[1:]
    if neutralise:
        rows = [[_neutralised(cell) for cell in row] for row in rows]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerows(rows)

    return buffer.getvalue()


def json_depth(value: Any) -> int:
    """Measure how deeply JSON containers nest, without recursion."""
    if not isinstance(value, dict | list):
        return 0
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        children = current.values() if isinstance(current, dict) else current
        stack.extend(
            (child, depth + 1) for child in children if isinstance(child, dict | list)
        )

    return deepest
