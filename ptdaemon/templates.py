"""The rules a template must meet, checked whenever one is saved."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import msgspec

from ptdaemon.dispatch.base import Dispatcher
from ptdaemon.errors import ForbiddenError, InvalidError
from ptdaemon.ids import new_id
from ptdaemon.mapping import check_paths
from ptdaemon.models import TARGET_TYPES, Method, Template, TemplateIn, User
from ptdaemon.redact import MASK, masked_places
from ptdaemon.signing import generate_secret, secret_bytes

AUTO_SECRET = "auto"  # noqa: S105 - asks for a generated secret


def check_name(name: str, what: str) -> None:
    """A name is printable characters, not only spaces.

    Format characters such as a right-to-left override count as unprintable:
    they make one name look like another.
    """
    if not name.strip() or not name.isprintable():
        raise InvalidError(
            f"{what}: must be printable characters, not only spaces",
            code="invalid",
        )


def convert(value: Any, kind: type[Any], what: str) -> Any:
    """msgspec.convert with a 422 that names the field."""
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidError(f"{what}: {exc}", code="invalid") from exc


class TemplateRules:
    """Turns a template as written into the one stored, or refuses it."""

    def __init__(
        self,
        dispatchers: dict[Method, Dispatcher],
        *,
        default_timeout_seconds: float,
        base_dir: Path,
    ) -> None:
        self.dispatchers = dispatchers
        self.default_timeout_seconds = default_timeout_seconds
        self.base_dir = base_dir

    def build(
        self, user: User, spec: TemplateIn, old: Template | None, now: float
    ) -> tuple[Template, str | None]:
        """Check a template as written and make the one to store.

        Returns it with the signing secret to show once (a generated one).
        """
        check_name(spec.name, "name")
        if spec.method is Method.CUSTOM and not user.admin:
            raise ForbiddenError("only an admin can use CUSTOM templates")
        target = self.check_target(spec)
        check_paths(spec.field_map, spec.required_fields)
        secret, shown = _signing_secret(spec.signing_secret)
        template = Template(
            id=old.id if old else new_id(),
            user_id=user.id,
            name=unicodedata.normalize("NFC", spec.name),
            method=spec.method,
            target=target,
            field_map=spec.field_map,
            required_fields=spec.required_fields,
            max_retries=spec.max_retries,
            retry_backoff_seconds=spec.retry_backoff_seconds,
            retry_backoff_max_seconds=spec.retry_backoff_max_seconds,
            retry_jitter=spec.retry_jitter,
            timeout_seconds=spec.timeout_seconds or self.default_timeout_seconds,
            signing_secret=secret,
            previous_secret=old.previous_secret if old else None,
            previous_secret_until=old.previous_secret_until if old else None,
            created_at=old.created_at if old else now,
            updated_at=now,
        )
        return template, shown

    def check_target(self, spec: TemplateIn) -> dict[str, Any]:
        unknown = masked_places(spec.target)
        if unknown:
            raise InvalidError(
                f"{', '.join(unknown)}: there is no stored secret to keep",
                code="invalid",
            )
        target_type = TARGET_TYPES[spec.method]
        target = convert(spec.target, target_type, "target")
        if spec.method is Method.FILE:
            directory = Path(target.directory)
            if not directory.is_absolute():
                directory = self.base_dir / directory
            target = msgspec.structs.replace(target, directory=str(directory))
        dispatcher = self.dispatchers.get(spec.method)
        if dispatcher is None:
            raise InvalidError(
                f"method {spec.method.value} is not available in this daemon",
                code="unsupported_method",
            )
        dispatcher.check_target(target)
        return msgspec.to_builtins(target)  # type: ignore[no-any-return]


def _signing_secret(value: str | None) -> tuple[str | None, str | None]:
    """The secret to store, and the one to show once (a generated one)."""
    if value is None or value == "":
        return None, None
    if value == MASK:
        raise InvalidError("signing_secret: there is no stored secret to keep")
    if value == AUTO_SECRET:
        secret = generate_secret()
        return secret, secret
    secret_bytes(value)
    return value, None
