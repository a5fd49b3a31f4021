"""Tests of ptdaemon.mapping: paths, required fields, encodings, placeholders, CSV."""

from __future__ import annotations

import csv
import io
from typing import Any

import msgspec
import pytest

from ptdaemon.errors import DeliveryError, InvalidError
from ptdaemon.mapping import (
    check_paths,
    check_template_text,
    csv_document,
    form_pairs,
    json_depth,
    map_payload,
    missing_required,
    normalise_key,
    placeholder_names,
    render,
    resolve,
    scalar_text,
)
from ptdaemon.models import ErrorCategory

NFC_E = "\u00e9"  # é as one code point
NFD_E = "e\u0301"  # é as e + combining acute


class TestResolve:
    def test_normalise_key_is_nfc(self) -> None:
        assert normalise_key(NFD_E) == NFC_E
        assert normalise_key(NFC_E) == NFC_E

    def test_dotted_path_walks_objects(self) -> None:
        data = {"address": {"postcode": "1234"}}

        assert resolve(data, "address.postcode") == (True, "1234")

    def test_decimal_key_indexes_a_list(self) -> None:
        data = {"items": [{"sku": "a"}, {"sku": "b"}]}

        assert resolve(data, "items.1.sku") == (True, "b")
        assert resolve(data, "items.2.sku") == (False, None)
        assert resolve(data, "items.-1.sku") == (False, None)

    def test_decimal_key_is_a_plain_key_in_an_object(self) -> None:
        assert resolve({"a": {"0": "zero"}}, "a.0") == (True, "zero")

    def test_list_path_keeps_dots_inside_keys(self) -> None:
        data = {"a.b": {"c": [10, 20]}}

        assert resolve(data, ["a.b", "c", "1"]) == (True, 20)
        assert resolve(data, "a.b.c") == (False, None)

    @pytest.mark.parametrize(
        ("data_key", "path"), [(NFD_E, NFC_E), (NFC_E, NFD_E), (NFD_E, NFD_E)]
    )
    def test_keys_compare_after_nfc_on_both_sides(
        self, data_key: str, path: str
    ) -> None:
        data = {"caf" + data_key: {"x": 1}}

        assert resolve(data, f"caf{path}.x") == (True, 1)
        assert resolve(data, [f"caf{path}", "x"]) == (True, 1)

    def test_missing_and_non_container_steps_are_not_found(self) -> None:
        data = {"a": "text", "b": None}

        assert resolve(data, "z") == (False, None)
        assert resolve(data, "a.b") == (False, None)
        assert resolve(data, "b.c") == (False, None)

    def test_found_null_differs_from_missing(self) -> None:
        assert resolve({"a": None}, "a") == (True, None)


class TestMapPayload:
    def test_empty_map_sends_data_as_is(self) -> None:
        data = {"b": 1, "a": {"c": 2}}

        assert map_payload(data, {}) == data

    def test_only_mapped_fields_in_map_order(self) -> None:
        data = {"full_name": "Ann", "address": {"postcode": "9000"}, "x": 1}
        field_map: dict[str, str | list[str]] = {
            "zip": "address.postcode",
            "applicant_name": "full_name",
        }

        payload = map_payload(data, field_map)

        assert payload == {"zip": "9000", "applicant_name": "Ann"}
        assert list(payload) == ["zip", "applicant_name"]

    def test_missing_paths_are_left_out(self) -> None:
        payload = map_payload({"a": 1}, {"one": "a", "two": "b.c"})

        assert payload == {"one": 1}

    def test_output_keys_stay_as_written(self) -> None:
        payload = map_payload({"caf" + NFC_E: 1}, {"out" + NFD_E: "caf" + NFD_E})

        assert list(payload) == ["out" + NFD_E]

    def test_values_are_sent_exactly(self) -> None:
        value = {"n": 1.5, "s": NFD_E, "l": [None, True]}

        assert map_payload({"v": value}, {"v": "v"}) == {"v": value}


class TestRequired:
    @pytest.mark.parametrize("value", [None, "", "   ", "\t\n", [], {}])
    def test_blank_values_count_as_missing(self, value: Any) -> None:
        assert missing_required({"a": value}, ["a"]) == ["a"]

    @pytest.mark.parametrize("value", [0, False, "x", [None], {"k": None}, 0.0])
    def test_present_values_count(self, value: Any) -> None:
        assert missing_required({"a": value}, ["a"]) == []

    def test_missing_paths_are_named_in_order(self) -> None:
        data = {"a": {"b": "x"}, "c.d": ""}
        required: list[str | list[str]] = ["a.b", "z", ["c.d"], "a.q"]

        assert missing_required(data, required) == ["z", "c.d", "a.q"]

    def test_required_keys_compare_after_nfc(self) -> None:
        assert missing_required({NFD_E: "x"}, [NFC_E]) == []


class TestCheckPaths:
    @pytest.mark.parametrize("path", ["", "a..b", ".a", "a.", [], ["a", ""]])
    def test_bad_field_map_path_is_named(self, path: str | list[str]) -> None:
        with pytest.raises(InvalidError) as info:
            check_paths({"out": path}, [])

        assert info.value.code == "invalid"
        assert "field_map.out" in info.value.message

    def test_bad_required_path_is_named(self) -> None:
        with pytest.raises(InvalidError) as info:
            check_paths({"out": "a"}, ["ok", "x..y"])

        assert "required_fields[1]" in info.value.message

    def test_good_paths_pass(self) -> None:
        check_paths({"a": "b.0.c", "d": ["e.f", "0"]}, ["a", ["b.c"]])


class TestScalarText:
    @pytest.mark.parametrize(
        ("raw", "text"),
        [
            (b"1.50", "1.5"),
            (b"1e2", "100.0"),
            (b"-0.0", "-0.0"),
            (b"123456789012345678901234567890", "123456789012345678901234567890"),
            (b"-7", "-7"),
            (b"true", "true"),
            (b"false", "false"),
            (b"null", ""),
            ('"Zo\u00eb \u2603"'.encode(), "Zo\u00eb \u2603"),
        ],
    )
    def test_decoded_json_scalar_spelling(self, raw: bytes, text: str) -> None:
        assert scalar_text(msgspec.json.decode(raw)) == text

    def test_strings_are_unchanged(self) -> None:
        assert scalar_text(NFD_E) == NFD_E
        assert scalar_text(" 01 ") == " 01 "

    @pytest.mark.parametrize("value", [{"a": 1}, [1]])
    def test_containers_are_refused(self, value: Any) -> None:
        with pytest.raises(DeliveryError) as info:
            scalar_text(value, field="addr")

        assert info.value.category is ErrorCategory.VALIDATION
        assert info.value.retryable is False
        assert "addr" in info.value.message


class TestFormPairs:
    def test_scalars_and_lists(self) -> None:
        payload = {"name": "Ann", "tags": ["a", 2, None], "ok": True, "n": 1.50}

        assert form_pairs(payload) == [
            ("name", "Ann"),
            ("tags", "a"),
            ("tags", "2"),
            ("tags", ""),
            ("ok", "true"),
            ("n", "1.5"),
        ]

    def test_empty_list_sends_nothing(self) -> None:
        assert form_pairs({"tags": []}) == []

    @pytest.mark.parametrize(
        "payload", [{"addr": {"city": "x"}}, {"addr": [1, {"city": "x"}]}]
    )
    def test_objects_are_a_validation_error(self, payload: dict[str, Any]) -> None:
        with pytest.raises(DeliveryError) as info:
            form_pairs(payload)

        assert info.value.category is ErrorCategory.VALIDATION
        assert "addr" in info.value.message
        assert info.value.details["retryable"] is False
        assert isinstance(info.value.details["exception"], str)


class TestRender:
    def test_fills_fields_with_scalar_text(self) -> None:
        fields = {"name": "Ann", "n": 1.50, "ok": False, "none": None}

        text = render("New {name}: {n} {ok} {none}.", fields)

        assert text == "New Ann: 1.5 false ."

    def test_containers_become_compact_json(self) -> None:
        fields = {"o": {"a": [1, "\u00e9"]}}

        assert render("{o}", fields) == '{"a":[1,"\u00e9"]}'

    def test_double_braces_are_literal(self) -> None:
        assert render("{{a}} {{{a}}} }}", {"a": "x"}) == "{a} {x} }"

    def test_names_compare_after_nfc(self) -> None:
        assert render("{caf" + NFD_E + "}", {"caf" + NFC_E: "yes"}) == "yes"

    def test_missing_name_is_a_validation_error(self) -> None:
        with pytest.raises(DeliveryError) as info:
            render("Hello {who}", {"name": "x"})

        assert info.value.category is ErrorCategory.VALIDATION
        assert "who" in info.value.message

    @pytest.mark.parametrize(
        "text", ["{a.b}", "{a[0]}", "{a!r}", "{a:>10}", "{a.__class__}"]
    )
    def test_format_syntax_is_refused(self, text: str) -> None:
        with pytest.raises(DeliveryError) as info:
            render(text, {"a": {"b": "secret"}})

        assert info.value.category is ErrorCategory.VALIDATION

    def test_dotted_name_that_is_a_key_is_used(self) -> None:
        assert render("{a.b}|{a!r}", {"a.b": "x", "a!r": "y"}) == "x|y"

    @pytest.mark.parametrize("text", ["{", "}", "a{b", "{}", "{a{b}}", "x}y"])
    def test_malformed_braces(self, text: str) -> None:
        with pytest.raises(InvalidError):
            check_template_text(text)
        with pytest.raises(DeliveryError) as info:
            render(text, {"a": 1, "b": 2})

        assert info.value.category is ErrorCategory.VALIDATION

    def test_placeholder_names_in_order_once(self) -> None:
        names = placeholder_names("{b} {{lit}} {a} {b} {x.y}")

        assert names == ["b", "a", "x.y"]

    def test_check_template_text_accepts_good_text(self) -> None:
        check_template_text("Dear {name}, {{braces}} {n}")


def _parse_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


class TestCsvDocument:
    def test_header_and_row_with_crlf(self) -> None:
        document = csv_document({"a": 1, "b": "x"})

        assert document == "a,b\r\n1,x\r\n"

    def test_rfc4180_quoting(self) -> None:
        payload = {"q": 'say "hi"', "c": "a,b", "n": "l1\nl2", "plain": "p"}

        document = csv_document(payload)

        assert document == 'q,c,n,plain\r\n"say ""hi""","a,b","l1\nl2",p\r\n'
        assert _parse_csv(document)[1] == ['say "hi"', "a,b", "l1\nl2", "p"]

    def test_cells_use_scalar_text_and_compact_json(self) -> None:
        payload = {"f": 1.50, "b": True, "z": None, "l": [1, 2], "o": {"k": "v"}}

        rows = _parse_csv(csv_document(payload))

        assert rows[1] == ["1.5", "true", "", "[1,2]", '{"k":"v"}']

    def test_header_can_be_left_out(self) -> None:
        assert csv_document({"a": 1}, header=False) == "1\r\n"

    def test_non_ascii_is_kept(self) -> None:
        assert csv_document({"n\u00e4me": "\u2603"}) == "n\u00e4me\r\n\u2603\r\n"

    @pytest.mark.parametrize(
        ("cell", "written"),
        [
            ("=SUM(A1)", "'=SUM(A1)"),
            ("+1+1", "'+1+1"),
            ("-1+1", "'-1+1"),
            ("@cmd", "'@cmd"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("-12.5", "-12.5"),
            ("+3", "+3"),
            ("-1e5", "-1e5"),
            ("-", "'-"),
            ("a=b", "a=b"),
            ("", ""),
        ],
    )
    def test_neutralisation(self, cell: str, written: str) -> None:
        rows = _parse_csv(csv_document({"c": cell}))

        assert rows[1] == [written]

    def test_negative_numbers_stay_numbers(self) -> None:
        assert _parse_csv(csv_document({"n": -12.5, "i": -3}))[1] == ["-12.5", "-3"]

    def test_header_cells_are_neutralised_too(self) -> None:
        assert _parse_csv(csv_document({"=x": 1}))[0] == ["'=x"]

    def test_neutralisation_can_be_turned_off(self) -> None:
        document = csv_document({"c": "=SUM(A1)"}, neutralise=False)

        assert _parse_csv(document)[1] == ["=SUM(A1)"]


class TestJsonDepth:
    @pytest.mark.parametrize(
        ("value", "depth"),
        [
            (1, 0),
            ("s", 0),
            (None, 0),
            ({}, 1),
            ([], 1),
            ({"a": [1]}, 2),
            ({"a": 1, "b": {"c": {"d": []}}}, 4),
            ([[], [[[]]], {}], 4),
        ],
    )
    def test_depths(self, value: Any, depth: int) -> None:
        assert json_depth(value) == depth

    def test_deep_nesting_without_recursion(self) -> None:
        value: Any = {}
        for _ in range(100_000):
            value = [value]

        assert json_depth(value) == 100_001
