"""Tests of the FILE dispatcher, on real files under tmp_path."""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import json
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ptdaemon.dispatch.base import Delivery
from ptdaemon.dispatch.file import FileDispatcher
from ptdaemon.errors import DeliveryError, InvalidError
from ptdaemon.models import ErrorCategory, FileTarget, Method, Template
from tests.factories import make_template

STARTED_AT = datetime(2024, 2, 29, 23, 59, 58, tzinfo=UTC).timestamp()

DeliveryFactory = Callable[..., Delivery]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "drops"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    return path


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def dispatcher(root: Path, state_dir: Path) -> FileDispatcher:
    return FileDispatcher(file_roots=[root], state_dir=state_dir)


def _template(target: dict[str, Any], name: str = "city-permit") -> Template:
    return make_template(
        Method.FILE, target, name=name, created_at=STARTED_AT, updated_at=STARTED_AT
    )


@pytest.fixture
def make_delivery() -> DeliveryFactory:
    def make(
        target: dict[str, Any],
        payload: dict[str, Any] | None = None,
        *,
        submission_id: str = "sub-1",
    ) -> Delivery:
        return Delivery(
            submission_id=submission_id,
            attempt=1,
            template=_template(target),
            payload={"full_name": "Ann"} if payload is None else payload,
            started_at=STARTED_AT,
        )

    return make


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _csv_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


class TestAtomicWrite:
    async def test_json_file_is_whole_and_alone(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        payload = {"full_name": "Zo\u00eb", "n": 1.5, "tags": ["a"], "x": None}
        delivery = make_delivery({"directory": str(root)}, payload)

        result = await dispatcher.deliver(delivery)

        path = root / "sub-1.json"
        assert result.response_data == {"path": str(path)}
        assert path.read_bytes().endswith(b"\n")
        assert json.loads(path.read_bytes()) == payload
        assert _tree(root) == ["sub-1.json"]

    async def test_rewrite_replaces_the_whole_file(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        target = {"directory": str(root), "filename": "same.json"}
        await dispatcher.deliver(make_delivery(target, {"long": "x" * 1000}))

        await dispatcher.deliver(make_delivery(target, {"short": 1}))

        assert json.loads((root / "same.json").read_bytes()) == {"short": 1}
        assert _tree(root) == ["same.json"]

    async def test_missing_directory_is_created(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        directory = root / "a" / "b"

        await dispatcher.deliver(make_delivery({"directory": str(directory)}))

        assert (directory / "sub-1.json").is_file()

    async def test_ndjson_and_csv_files(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        payload = {"name": "=cmd", "n": -12.5}
        ndjson = {"directory": str(root), "filename": "x.ndjson", "format": "ndjson"}
        csv_target = {"directory": str(root), "filename": "x.csv", "format": "csv"}

        await dispatcher.deliver(make_delivery(ndjson, payload))
        await dispatcher.deliver(make_delivery(csv_target, payload))

        assert (root / "x.ndjson").read_bytes() == b'{"name":"=cmd","n":-12.5}\n'
        assert (root / "x.csv").read_bytes() == b"name,n\r\n'=cmd,-12.5\r\n"

    async def test_csv_neutralise_can_be_turned_off(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        target = {
            "directory": str(root),
            "filename": "x.csv",
            "format": "csv",
            "csv_neutralise": False,
        }

        await dispatcher.deliver(make_delivery(target, {"f": "=SUM(A1)"}))

        assert _csv_rows(root / "x.csv") == [["f"], ["=SUM(A1)"]]

    async def test_fsync_file_then_rename_then_fsync_directory(
        self,
        dispatcher: FileDispatcher,
        root: Path,
        make_delivery: DeliveryFactory,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        events: list[str] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
            events.append("fsync " + kind)
            real_fsync(fd)

        def replace(src: str, dst: str, **kwargs: Any) -> None:
            assert src.startswith(".")
            assert ".tmp" in src
            events.append("replace")
            real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

        await dispatcher.deliver(make_delivery({"directory": str(root)}))

        assert events == ["fsync file", "replace", "fsync dir"]

    async def test_failed_rename_leaves_no_file_and_is_a_system_error(
        self,
        dispatcher: FileDispatcher,
        root: Path,
        make_delivery: DeliveryFactory,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        def replace(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "replace", replace)

        with pytest.raises(DeliveryError) as info:
            await dispatcher.deliver(make_delivery({"directory": str(root)}))

        assert info.value.category is ErrorCategory.SYSTEM
        assert info.value.retryable is True
        assert info.value.details["retryable"] is True
        assert info.value.details["exception"] == "OSError"
        assert _tree(root) == []


class TestAppend:
    async def test_ndjson_appends_one_line_each(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        target = {
            "directory": str(root),
            "filename": "log.ndjson",
            "format": "ndjson",
            "append": True,
        }

        for number in range(3):
            await dispatcher.deliver(make_delivery(target, {"n": number}))

        lines = (root / "log.ndjson").read_bytes().splitlines()
        assert [json.loads(line) for line in lines] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert _tree(root) == ["log.ndjson"]

    async def test_csv_header_only_once(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        target = {
            "directory": str(root),
            "filename": "log.csv",
            "format": "csv",
            "append": True,
        }

        await dispatcher.deliver(make_delivery(target, {"a": "x,y", "b": 1}))
        await dispatcher.deliver(make_delivery(target, {"a": "+1+1", "b": 2}))

        content = (root / "log.csv").read_bytes()
        assert content == b'a,b\r\n"x,y",1\r\n\'+1+1,2\r\n'

    async def test_empty_existing_csv_gets_a_header(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        (root / "log.csv").touch()
        target = {
            "directory": str(root),
            "filename": "log.csv",
            "format": "csv",
            "append": True,
        }

        await dispatcher.deliver(make_delivery(target, {"a": 1}))

        assert _csv_rows(root / "log.csv") == [["a"], ["1"]]

    async def test_concurrent_appends_write_the_header_once(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        target = {
            "directory": str(root),
            "filename": "log.csv",
            "format": "csv",
            "append": True,
        }
        deliveries = [make_delivery(target, {"n": n}) for n in range(20)]

        await asyncio.gather(*(dispatcher.deliver(d) for d in deliveries))

        rows = _csv_rows(root / "log.csv")
        assert rows[0] == ["n"]
        assert sorted(int(row[0]) for row in rows[1:]) == list(range(20))

    async def test_symlinked_file_is_refused(
        self,
        dispatcher: FileDispatcher,
        root: Path,
        outside: Path,
        make_delivery: DeliveryFactory,
    ) -> None:
        victim = outside / "victim.ndjson"
        victim.write_text("keep\n")
        (root / "log.ndjson").symlink_to(victim)
        target = {
            "directory": str(root),
            "filename": "log.ndjson",
            "format": "ndjson",
            "append": True,
        }

        with pytest.raises(DeliveryError) as info:
            await dispatcher.deliver(make_delivery(target))

        assert info.value.category is ErrorCategory.VALIDATION
        assert victim.read_text() == "keep\n"


class TestFilename:
    async def test_builtin_and_payload_placeholders(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        target = {
            "directory": str(root),
            "filename": "{template}_{date}_{id}_{kind}.json",
        }
        delivery = make_delivery(target, {"kind": "renewal"}, submission_id="abc")

        result = await dispatcher.deliver(delivery)

        expected = root / "city-permit_2024-02-29_abc_renewal.json"
        assert result.response_data == {"path": str(expected)}
        assert expected.is_file()

    async def test_builtins_win_over_payload_fields(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        target = {"directory": str(root), "filename": "{id}.json"}

        await dispatcher.deliver(make_delivery(target, {"id": "../evil"}))

        assert _tree(root) == ["sub-1.json"]

    @pytest.mark.parametrize(
        "value",
        [
            "../x",
            "a/b",
            "a\\b",
            "a\0b",
            "..",
            ".",
            "",
            "\u00e9" * 128,
            "a\nb",
            "a\x7fb",
            ".hidden",
            ".ptdaemon-x.tmp",
        ],
    )
    async def test_unsafe_names_are_refused(
        self,
        dispatcher: FileDispatcher,
        root: Path,
        tmp_path: Path,
        make_delivery: DeliveryFactory,
        value: str,
    ) -> None:
        target = {"directory": str(root), "filename": "{name}"}
        before = _tree(tmp_path)

        with pytest.raises(DeliveryError) as info:
            await dispatcher.deliver(make_delivery(target, {"name": value}))

        assert info.value.category is ErrorCategory.VALIDATION
        assert info.value.retryable is False
        assert info.value.details["retryable"] is False
        assert isinstance(info.value.details["exception"], str)
        assert _tree(tmp_path) == before

    async def test_an_empty_value_before_an_extension_is_refused(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        # "{ref}.json" with an empty ref would be ".json" for every submission.
        target = {"directory": str(root), "filename": "{ref}.json"}

        with pytest.raises(DeliveryError) as info:
            await dispatcher.deliver(make_delivery(target, {"ref": ""}))

        assert info.value.category is ErrorCategory.VALIDATION
        assert _tree(root) == []

    async def test_255_byte_name_is_allowed(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        name = "\u00e9" * 127 + "x"
        target = {"directory": str(root), "filename": "{name}"}

        await dispatcher.deliver(make_delivery(target, {"name": name}))

        assert (root / name).is_file()

    async def test_missing_placeholder_field_is_validation(
        self, dispatcher: FileDispatcher, root: Path, make_delivery: DeliveryFactory
    ) -> None:
        target = {"directory": str(root), "filename": "{nope}.json"}

        with pytest.raises(DeliveryError) as info:
            await dispatcher.deliver(make_delivery(target))

        assert info.value.category is ErrorCategory.VALIDATION
        assert "nope" in info.value.message


class TestCheckTarget:
    def test_root_and_below_are_accepted(
        self, dispatcher: FileDispatcher, root: Path
    ) -> None:
        dispatcher.check_target(FileTarget(directory=str(root)))
        dispatcher.check_target(FileTarget(directory=str(root / "new" / "sub")))

    def test_plain_dict_is_accepted(
        self, dispatcher: FileDispatcher, root: Path
    ) -> None:
        dispatcher.check_target({"directory": str(root), "format": "csv"})

    @pytest.mark.parametrize(
        "directory", ["/", "{outside}", "{root}/../outside", "relative/dir"]
    )
    def test_directories_outside_roots_are_refused(
        self, dispatcher: FileDispatcher, root: Path, outside: Path, directory: str
    ) -> None:
        spelled = directory.format(root=root, outside=outside)

        with pytest.raises(InvalidError) as info:
            dispatcher.check_target(FileTarget(directory=spelled))

        assert info.value.code == "invalid"
        assert "target.directory" in info.value.message

    def test_symlink_out_of_the_root_is_refused(
        self, dispatcher: FileDispatcher, root: Path, outside: Path
    ) -> None:
        (root / "link").symlink_to(outside)

        with pytest.raises(InvalidError):
            dispatcher.check_target(FileTarget(directory=str(root / "link")))

    def test_symlink_inside_the_root_is_accepted(
        self, dispatcher: FileDispatcher, root: Path
    ) -> None:
        (root / "real").mkdir()
        (root / "link").symlink_to(root / "real")

        dispatcher.check_target(FileTarget(directory=str(root / "link")))

    def test_state_dir_never_counts(self, tmp_path: Path) -> None:
        state_dir = tmp_path / "state"
        dispatcher = FileDispatcher(file_roots=[tmp_path], state_dir=state_dir)

        for directory in (state_dir, state_dir / "sub"):
            with pytest.raises(InvalidError):
                dispatcher.check_target(FileTarget(directory=str(directory)))
        dispatcher.check_target(FileTarget(directory=str(tmp_path / "drops")))

    def test_no_roots_refuses_everything(self, tmp_path: Path) -> None:
        dispatcher = FileDispatcher(file_roots=[], state_dir=tmp_path / "state")

        with pytest.raises(InvalidError):
            dispatcher.check_target(FileTarget(directory=str(tmp_path)))

    def test_append_needs_a_line_format(
        self, dispatcher: FileDispatcher, root: Path
    ) -> None:
        target = FileTarget(directory=str(root), format="json", append=True)

        with pytest.raises(InvalidError) as info:
            dispatcher.check_target(target)

        assert "append" in info.value.message

    @pytest.mark.parametrize(
        "filename",
        [
            "{id",
            "id}",
            "{}",
            "../{id}.json",
            "{id}/x",
            "..",
            "",
            "a\0b",
            ".{id}",
            "a\nb",
        ],
    )
    def test_bad_filenames_are_refused(
        self, dispatcher: FileDispatcher, root: Path, filename: str
    ) -> None:
        with pytest.raises(InvalidError) as info:
            dispatcher.check_target(FileTarget(directory=str(root), filename=filename))

        assert "target.filename" in info.value.message


class TestDeliveryTimeConfinement:
    async def test_symlink_swapped_in_after_saving_is_refused(
        self,
        dispatcher: FileDispatcher,
        root: Path,
        outside: Path,
        make_delivery: DeliveryFactory,
    ) -> None:
        directory = root / "inbox"
        directory.mkdir()
        dispatcher.check_target(FileTarget(directory=str(directory)))
        directory.rmdir()
        directory.symlink_to(outside)

        with pytest.raises(DeliveryError) as info:
            await dispatcher.deliver(make_delivery({"directory": str(directory)}))

        assert info.value.category is ErrorCategory.VALIDATION
        assert list(outside.iterdir()) == []

    async def test_symlink_raced_in_after_the_check_is_not_followed(
        self,
        dispatcher: FileDispatcher,
        root: Path,
        outside: Path,
        make_delivery: DeliveryFactory,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        directory = root / "inbox"
        directory.symlink_to(outside)
        # The check sees the directory as it was a moment before the swap.
        monkeypatch.setattr(dispatcher, "_confine", lambda _: (root, directory))

        with pytest.raises(DeliveryError) as info:
            await dispatcher.deliver(make_delivery({"directory": str(directory)}))

        assert info.value.category is ErrorCategory.VALIDATION
        assert list(outside.iterdir()) == []

    async def test_roots_removed_from_config_refuse_delivery(
        self, root: Path, state_dir: Path, make_delivery: DeliveryFactory
    ) -> None:
        dispatcher = FileDispatcher(file_roots=[], state_dir=state_dir)

        with pytest.raises(DeliveryError) as info:
            await dispatcher.deliver(make_delivery({"directory": str(root)}))

        assert info.value.category is ErrorCategory.VALIDATION
        assert _tree(root) == []

    async def test_state_dir_refused_at_delivery(
        self, tmp_path: Path, make_delivery: DeliveryFactory
    ) -> None:
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        dispatcher = FileDispatcher(file_roots=[tmp_path], state_dir=state_dir)

        with pytest.raises(DeliveryError) as info:
            await dispatcher.deliver(make_delivery({"directory": str(state_dir)}))

        assert info.value.category is ErrorCategory.VALIDATION
        assert list(state_dir.iterdir()) == []


class TestMisc:
    def test_method_and_destination_key(
        self, dispatcher: FileDispatcher, root: Path
    ) -> None:
        (root / "real").mkdir()
        (root / "link").symlink_to(root / "real")
        template = _template({"directory": str(root / "link")})

        assert dispatcher.method is Method.FILE
        key = dispatcher.destination_key(template)
        assert key == "file:" + os.path.realpath(root / "real")

    async def test_close_does_nothing(self, dispatcher: FileDispatcher) -> None:
        await dispatcher.close()


async def test_a_failed_append_leaves_no_partial_line(
    dispatcher: FileDispatcher, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ptdaemon.dispatch import file as file_module

    target = {"directory": str(root), "filename": "log.ndjson", "format": "ndjson"}
    target["append"] = True
    template = _template(target)
    first = Delivery(
        submission_id="a",
        attempt=1,
        template=template,
        payload={"n": 1},
        started_at=STARTED_AT,
    )
    await dispatcher.deliver(first)
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        written = real_write(fd, bytes(data[: len(data) // 2]))
        monkeypatch.setattr(file_module.os, "write", _raise_enospc)
        return written

    def _raise_enospc(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module.os, "write", half_then_full)
    second = Delivery(
        submission_id="b",
        attempt=1,
        template=template,
        payload={"n": 2, "pad": "x" * 100},
        started_at=STARTED_AT,
    )
    with pytest.raises(DeliveryError) as failed:
        await dispatcher.deliver(second)

    assert failed.value.category is ErrorCategory.SYSTEM
    assert (root / "log.ndjson").read_text() == '{"n":1}\n'
