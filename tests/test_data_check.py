"""What a submission's data may hold: JSON values, nested to a limit."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ptdaemon.errors import InvalidError
from ptdaemon.service import MAX_DATA_DEPTH, check_data


def nested(depth: int) -> dict[str, Any]:
    """A dict holding lists and dicts `depth` containers deep, itself included."""
    data: Any = "leaf"
    for level in range(depth - 1):
        data = [data] if level % 2 else {"k": data}
    return {"top": data}


def test_json_values_of_every_kind_pass():
    check_data({"s": "x", "i": 1, "f": 1.5, "b": True, "n": None, "l": [1, {"a": []}]})


def test_nesting_up_to_the_limit_passes_and_one_more_is_too_deep():
    check_data(nested(MAX_DATA_DEPTH))
    with pytest.raises(InvalidError) as raised:
        check_data(nested(MAX_DATA_DEPTH + 1))
    assert raised.value.code == "too_deep"


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        ({"a": math.nan}, "NaN"),
        ({"a": [1, {"b": -math.inf}]}, "NaN"),
        ({"a": b"raw"}, "bytes"),
        ({"a": {1: "x"}}, "keys must be strings"),
        ({"a": [{"b": {2, 3}}]}, "set"),
    ],
)
def test_what_json_cannot_carry_is_refused(data: dict[str, Any], phrase: str):
    with pytest.raises(InvalidError) as raised:
        check_data(data)
    assert phrase in raised.value.message
    assert raised.value.code == "invalid"
