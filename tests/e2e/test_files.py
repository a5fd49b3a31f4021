"""FILE delivery into the drop root: whole files, appends, names and confinement."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def tree(root: Path) -> set[str]:
    """Every file and directory under `root`, but the daemon's state and log."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts[:1] == ("state",):
            continue
        for name in dirnames + filenames:
            found.add(str(rel / name))
    found.discard("daemon.log")
    return found


async def file_template(api: Any, process: Any, **target: Any) -> dict[str, Any]:
    body = {"directory": str(process.root / "drop" / "sub"), **target}
    return await api.template(method="FILE", target=body, retry_backoff_seconds=0.05)


async def deliver(api: Any, template: dict[str, Any], data: Any) -> dict[str, Any]:
    sub = await api.submit(template["id"], data)
    final = await api.wait_final(sub["id"])
    assert final["status"] == "completed", final
    return final  # type: ignore[no-any-return]


async def test_json_drop_appears_whole(start_daemon):
    process, api = await start_daemon()
    directory = process.root / "drop" / "sub"
    assert not directory.exists()
    template = await file_template(api, process)
    data = {"name": "Ada", "n": 1.5, "ok": True, "tags": ["x"], "city": "Zürich"}

    final = await deliver(api, template, data)

    written = directory / f"{final['id']}.json"
    assert sorted(os.listdir(directory)) == [written.name]
    assert json.loads(written.read_bytes().decode("utf-8")) == data
    assert final["error_category"] is None


async def test_field_placeholders_in_the_filename(start_daemon):
    process, api = await start_daemon()
    template = await file_template(
        api, process, filename="{name}-{n}-{template}-{date}-{id}.json"
    )

    final = await deliver(api, template, {"name": "Ada", "n": 7})

    day = datetime.now(UTC).strftime("%Y-%m-%d")
    expected = f"Ada-7-{template['name']}-{day}-{final['id']}.json"
    assert os.listdir(process.root / "drop" / "sub") == [expected]


async def test_ndjson_append_adds_one_line_per_submission(start_daemon):
    process, api = await start_daemon()
    template = await file_template(
        api, process, filename="all.ndjson", format="ndjson", append=True
    )
    first = {"name": "Ada", "n": 1}
    second = {"name": "Grace", "n": 2, "note": "two\nlines"}

    await deliver(api, template, first)
    await deliver(api, template, second)

    content = (process.root / "drop" / "sub" / "all.ndjson").read_bytes()
    assert content.endswith(b"\n")
    lines = content.decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [first, second]
    assert os.listdir(process.root / "drop" / "sub") == ["all.ndjson"]


async def test_csv_append_has_one_header_and_neutralised_cells(start_daemon):
    process, api = await start_daemon()
    template = await file_template(
        api, process, filename="all.csv", format="csv", append=True
    )

    await deliver(api, template, {"name": "Ada", "formula": "=1+2", "n": "-5"})
    await deliver(api, template, {"name": 'Grace "G", H', "formula": "@x", "n": -1.5})

    content = (process.root / "drop" / "sub" / "all.csv").read_bytes()
    assert content == (
        b'name,formula,n\r\nAda,\'=1+2,-5\r\n"Grace ""G"", H",\'@x,-1.5\r\n'
    )


async def test_csv_whole_file_per_submission(start_daemon):
    process, api = await start_daemon()
    template = await file_template(api, process, filename="{id}.csv", format="csv")

    final = await deliver(api, template, {"ünï": "ü", "list": [1, "a"], "none": None})

    content = (process.root / "drop" / "sub" / f"{final['id']}.csv").read_bytes()
    assert content == 'ünï,list,none\r\nü,"[1,""a""]",\r\n'.encode()


async def test_a_filename_that_tries_to_leave_fails_and_writes_nothing(start_daemon):
    process, api = await start_daemon()
    template = await file_template(api, process, filename="{name}.json")
    before = tree(process.root)

    sub = await api.submit(template["id"], {"name": "../../etc/x"})
    final = await api.wait_final(sub["id"])

    assert final["status"] == "failed"
    assert final["error_category"] == "validation"
    assert final["error_details"]["retryable"] is False
    assert len(await api.attempts(sub["id"])) == 1
    assert not (process.root / "etc").exists()
    new = tree(process.root) - before
    assert new <= {"drop/sub"}, new


async def test_directory_outside_the_file_roots_is_refused_on_save(start_daemon):
    process, api = await start_daemon()
    outside = process.root / "outside"
    outside.mkdir()
    (process.root / "drop" / "link").symlink_to(outside, target_is_directory=True)
    refused = [
        str(outside),
        str(process.root / "drop" / ".." / "outside"),
        str(process.root / "drop" / "link" / "x"),
        str(process.state / "files"),
        "/tmp",
    ]

    for index, directory in enumerate(refused):
        status, body = await api.request(
            "POST",
            "/v1/templates",
            {
                "name": f"f-{index}",
                "method": "FILE",
                "target": {"directory": directory},
            },
        )
        assert status == 422, (directory, status, body)
        assert set(body["error"]) == {"code", "message", "details"}
    assert os.listdir(outside) == []
    # The root itself counts.
    status, _ = await api.request(
        "POST",
        "/v1/templates",
        {
            "name": "root",
            "method": "FILE",
            "target": {"directory": str(process.root / "drop")},
        },
    )
    assert status == 201


async def test_directory_with_a_nul_byte_is_422_not_500(start_daemon):
    process, api = await start_daemon()

    for directory in ("\x00", str(process.root / "drop" / "a\x00b")):
        answer = await api.send(
            "POST",
            "/v1/templates",
            headers={"Content-Type": "application/json"},
            raw=json.dumps(
                {"name": "nul", "method": "FILE", "target": {"directory": directory}}
            ).encode(),
        )
        assert answer.status == 422, (directory, answer.status, answer.raw)
        assert set(answer.json["error"]) == {"code", "message", "details"}
