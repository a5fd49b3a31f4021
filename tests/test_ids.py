"""Ids: well-formed random UUIDs, never repeated, not even across a fork."""

from __future__ import annotations

import os
import uuid

from ptdaemon.ids import new_id


def test_ids_are_version_4_uuids_in_canonical_form():
    for _ in range(5000):
        text = new_id()
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


def test_ids_do_not_repeat_and_use_every_variant():
    ids = [new_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert {text[19] for text in ids} == set("89ab")


def test_a_forked_child_does_not_repeat_its_parents_next_ids():
    new_id()  # the buffer is filled and part-used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, ",".join(new_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split(","))
    os.waitpid(pid, 0)
    parent = {new_id() for _ in range(50)}
    assert len(child) == 50
    assert not child & parent
