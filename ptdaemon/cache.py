"""Templates kept in memory: every create and every attempt needs one.

Only this process changes templates, and it calls `changed()` after each
change commits, which drops them all. A read that was in flight across a
change is returned to its caller but not kept.
"""

from __future__ import annotations

from typing import Any, Final

from ptdaemon import queries
from ptdaemon.models import Template
from ptdaemon.store import Store

CACHE_MAX: Final = 10_000


class TemplateCache:
    """Templates by id, read through from the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._items: dict[str, Template] = {}
        self._generation = 0

    def peek(self, template_id: str) -> Template | None:
        """The template when it is in memory; None says nothing about the store."""
        return self._items.get(template_id)

    async def get(self, template_id: str) -> Template | None:
        """The template, or None when the store has no such template."""
        template = self._items.get(template_id)
        if template is None:
            generation = self._generation
            template = await self._store.read(
                lambda c: queries.get_template(c, template_id, None)
            )
            if template is not None and generation == self._generation:
                remember(self._items, template_id, template)
        return template

    def changed(self) -> None:
        """A template was created, changed or deleted: forget them all."""
        self._generation += 1
        self._items.clear()


def remember(cache: dict[str, Any], key: str, value: Any) -> None:
    """Keep `value`; a full cache starts again empty rather than grow."""
    if len(cache) >= CACHE_MAX:
        cache.clear()
    cache[key] = value
