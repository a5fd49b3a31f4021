"""The service layer: every operation a user can ask for, scoped to that user.

The API, the CLI (through the API) and embedding programs all come through
here. Nothing here knows about HTTP; errors are ServiceErrors that the API
maps to its JSON body.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import unicodedata
import uuid
from pathlib import Path
from typing import Any, Final

import msgspec

from ptdaemon import crashpoints, queries
from ptdaemon.cache import TemplateCache, remember
from ptdaemon.dispatch.base import Dispatcher
from ptdaemon.errors import (
    BadRequestError,
    ConflictError,
    DeliveryError,
    ForbiddenError,
    InvalidError,
    NotFoundError,
    ServiceError,
)
from ptdaemon.ids import new_id
from ptdaemon.mapping import (
    check_paths,
    form_pairs,
    map_payload,
    missing_required,
)
from ptdaemon.metrics import UNKNOWN_METHOD, Metrics
from ptdaemon.models import (
    Method,
    PreviewIn,
    Stats,
    Status,
    Submission,
    SubmissionIn,
    Template,
    TemplateIn,
    User,
    UserIn,
)
from ptdaemon.redact import MASK, unmask_target
from ptdaemon.scheduler import Scheduler
from ptdaemon.signing import generate_secret
from ptdaemon.store import Store
from ptdaemon.templates import AUTO_SECRET, TemplateRules, check_name, convert
from ptdaemon.timeutil import now as wall_now
from ptdaemon.timeutil import parse_time

log = logging.getLogger(__name__)

TOKEN_PREFIX: Final = "ptd_"  # noqa: S105 - a prefix, not a secret
MAX_DATA_DEPTH: Final = 32
ADMIN_NAME: Final = "admin"
LATEST_TIME: Final = 253402300799.0  # 9999-12-31T23:59:59Z


def write_token_file(path: Path, token: str) -> None:
    """Write a token file, owner-only from the first byte, replacing any old one."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def hash_token(token: str) -> str:
    # A header that is not valid UTF-8 arrives with surrogates: it matches no
    # token, but it must hash like anything else.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


IDEMPOTENCY_KEY_MAX: Final = 255


def _check_header_key(key: str) -> None:
    """The Idempotency-Key header obeys the body field's rules."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidError(
            "Idempotency-Key is not valid UTF-8", code="invalid"
        ) from None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX:
        raise InvalidError(
            f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters",
            code="invalid",
        )


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class Service:
    """Users, templates and submissions, for one store and one scheduler."""

    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        dispatchers: dict[Method, Dispatcher],
        *,
        default_timeout_seconds: float,
        base_dir: Path,
        templates_per_user: int,
        unfinished_per_user: int | None = None,
        metrics: Metrics | None = None,
        templates: TemplateCache | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.scheduler = scheduler
        self.dispatchers = dispatchers
        self.rules = TemplateRules(
            dispatchers,
            default_timeout_seconds=default_timeout_seconds,
            base_dir=base_dir,
        )
        self.templates_per_user = templates_per_user
        self.token_path: Path | None = None
        # What each create reads, kept in memory: a token's user and a
        # template. Dropped whole on any change of users or templates.
        self._tokens: dict[str, User] = {}
        self._users_generation = 0
        self.templates = templates or TemplateCache(store)
        self.unfinished_per_user = unfinished_per_user

    # -- users -------------------------------------------------------------

    async def authenticate(self, token: str) -> User | None:
        digest = hash_token(token)
        user = self._tokens.get(digest)
        if user is None:
            generation = self._users_generation
            user = await self.store.read(lambda c: queries.user_by_token(c, digest))
            # Only this process changes users, and each change bumps the
            # generation: an answer read across a change is not kept.
            if user is not None and generation == self._users_generation:
                remember(self._tokens, digest, user)
        return user

    def _users_changed(self) -> None:
        self._users_generation += 1
        self._tokens.clear()

    def _templates_changed(self) -> None:
        self.templates.changed()

    async def user_by_name(self, name: str) -> User | None:
        return await self.store.read(lambda c: queries.user_by_name(c, name))

    async def ensure_admin(self, token_path: Path) -> User | None:
        """On a first start, create `admin` and write its token file once."""
        self.token_path = token_path
        count = await self.store.read(queries.count_users)
        if count:
            return None
        token = new_token()
        user = User(id=new_id(), name=ADMIN_NAME, admin=True, created_at=wall_now())
        await self.store.write(
            lambda c: queries.insert_user(c, user, hash_token(token))
        )
        await asyncio.to_thread(write_token_file, token_path, token)
        log.info("admin user created", extra={"path": str(token_path)})
        return user

    async def create_user(self, actor: User, body: Any) -> tuple[User, str]:
        _require_admin(actor)
        spec: UserIn = convert(body, UserIn, "user")
        check_name(spec.name, "name")
        token = new_token()
        user = User(
            id=new_id(),
            name=spec.name,
            admin=spec.admin,
            created_at=wall_now(),
        )
        await self.store.write(
            lambda c: queries.insert_user(c, user, hash_token(token))
        )
        log.info("user created", extra={"user_id": user.id, "admin": user.admin})
        return user, token

    async def list_users(self, actor: User) -> list[User]:
        _require_admin(actor)
        return await self.store.read(queries.list_users)

    async def delete_user(self, actor: User, user_id: str) -> None:
        _require_admin(actor)
        if user_id == actor.id:
            raise ConflictError("you cannot delete yourself", code="invalid_state")
        admin = await self.user_by_name(ADMIN_NAME)
        if admin is not None and admin.id == user_id:
            raise ConflictError(
                "the admin user cannot be deleted; rotate its token instead",
                code="invalid_state",
            )
        now = wall_now()
        # Limit: these cancellations are not counted in the metrics of finished
        # submissions, which go by method; the log line carries their number.
        cancelled = await self.store.write(
            lambda c: queries.delete_user(c, user_id, now)
        )
        self._users_changed()
        log.info("user revoked", extra={"user_id": user_id, "cancelled": cancelled})

    async def rotate_token(self, actor: User, user_id: str) -> tuple[User, str]:
        _require_admin(actor)
        token = new_token()
        digest = hash_token(token)
        user = await self.store.write(lambda c: queries.set_token(c, user_id, digest))
        self._users_changed()
        if user.name == ADMIN_NAME and self.token_path is not None:
            # The CLI reads this file: it must not keep a token that is dead.
            await asyncio.to_thread(write_token_file, self.token_path, token)
            log.info("admin token file rewritten", extra={"path": str(self.token_path)})
        log.info("user token rotated", extra={"user_id": user_id})
        return user, token

    # -- templates ---------------------------------------------------------

    async def create_template(
        self, user: User, body: Any
    ) -> tuple[Template, str | None]:
        spec: TemplateIn = convert(body, TemplateIn, "template")
        now = wall_now()
        template, shown = self.rules.build(user, spec, None, now)
        limit = self.templates_per_user
        await self.store.write(lambda c: queries.insert_template(c, template, limit))
        log.info("template created", extra={"template_id": template.id})
        return template, shown

    async def update_template(
        self, user: User, template_id: str, patch: Any
    ) -> tuple[Template, str | None]:
        if not isinstance(patch, dict):
            raise InvalidError("a merge patch must be a JSON object")
        old = await self.get_template(user, template_id)
        merged = merge_patch(self.template_input(old), patch)
        merged["target"] = unmask_target(merged.get("target"), old.target)
        if merged.get("signing_secret") == MASK and old.signing_secret:
            merged["signing_secret"] = old.signing_secret
        spec: TemplateIn = convert(merged, TemplateIn, "template")
        template, shown = self.rules.build(user, spec, old, wall_now())
        await self.store.write(lambda c: queries.update_template(c, template))
        self._templates_changed()
        log.info("template updated", extra={"template_id": template.id})
        return template, shown

    async def upsert_template(self, user: User, spec: TemplateIn) -> Template:
        """Create or overwrite a template by name (the config file's templates)."""
        name = unicodedata.normalize("NFC", spec.name)
        old = await self.store.read(
            lambda c: queries.template_by_name(c, user.id, name)
        )
        if (
            spec.signing_secret == AUTO_SECRET
            and old is not None
            and old.signing_secret
        ):
            # "auto" in the config file keeps the secret made at the first start.
            spec = msgspec.structs.replace(spec, signing_secret=old.signing_secret)
        template, _ = self.rules.build(user, spec, old, wall_now())
        if old is None:
            await self.store.write(lambda c: queries.insert_template(c, template))
        else:
            await self.store.write(lambda c: queries.update_template(c, template))
        self._templates_changed()
        return template

    def template_input(self, template: Template) -> dict[str, Any]:
        """A stored template as a client would write it, secrets included."""
        fields = msgspec.to_builtins(template)
        keep = set(TemplateIn.__struct_fields__)
        return {k: v for k, v in fields.items() if k in keep}

    async def get_template(self, user: User, template_id: str) -> Template:
        found = await self.store.read(
            lambda c: queries.get_template(c, template_id, user.id)
        )
        if found is None:
            raise NotFoundError("no such template")
        return found

    async def list_templates(self, user: User) -> list[Template]:
        return await self.store.read(lambda c: queries.list_templates(c, user.id))

    async def delete_template(self, user: User, template_id: str) -> None:
        await self.store.write(
            lambda c: queries.delete_template(c, template_id, user.id)
        )
        self._templates_changed()
        log.info("template deleted", extra={"template_id": template_id})

    async def preview(self, user: User, template_id: str, body: Any) -> Any:
        template = await self.get_template(user, template_id)
        spec: PreviewIn = convert(body, PreviewIn, "preview")
        data = spec.data
        check_data(data)
        field_map = template.field_map
        if spec.field_map is not None:
            # A map being edited, tried on the sample before it is saved.
            field_map = spec.field_map
            check_paths(field_map, [])
        missing = missing_required(data, template.required_fields)
        if missing:
            raise InvalidError(
                f"required fields missing: {', '.join(missing)}",
                code="missing_required_fields",
                details={"fields": missing},
            )
        payload = map_payload(data, field_map)
        _check_encodable(template, payload)
        return payload

    async def rotate_secret(
        self, user: User, template_id: str, grace_seconds: float
    ) -> str:
        old = await self.get_template(user, template_id)
        now = wall_now()
        secret = generate_secret()
        template = msgspec.structs.replace(
            old,
            signing_secret=secret,
            previous_secret=old.signing_secret,
            previous_secret_until=now + grace_seconds if old.signing_secret else None,
            updated_at=now,
        )
        await self.store.write(lambda c: queries.update_template(c, template))
        self._templates_changed()
        log.info("signing secret rotated", extra={"template_id": template_id})
        return secret

    # -- submissions -------------------------------------------------------

    async def create_submission(
        self, user: User, body: Any, *, header_key: str | None = None
    ) -> tuple[Submission, bool]:
        item = await self._new_submission(user, body, header_key)
        [result] = await self._insert([item])
        if isinstance(result, ServiceError):
            raise result
        return result

    async def create_batch(
        self, user: User, bodies: list[Any]
    ) -> list[tuple[Submission, bool] | ServiceError]:
        """Validate each item alone; insert the valid ones in one transaction."""
        results: list[Any] = []
        valid: list[tuple[int, tuple[queries.NewSubmission, Method]]] = []
        for index, body in enumerate(bodies):
            try:
                item = await self._new_submission(user, body, None)
            except (InvalidError, BadRequestError) as exc:
                results.append(exc)
            else:
                results.append(None)
                valid.append((index, item))
        if valid:
            inserted = await self._insert([item for _, item in valid])
            for (index, _), outcome in zip(valid, inserted, strict=True):
                results[index] = outcome
        return results

    async def _insert(
        self, items: list[tuple[queries.NewSubmission, Method]]
    ) -> list[tuple[Submission, bool] | ServiceError]:
        rows = [item for item, _ in items]
        limit = self.unfinished_per_user
        results = await self.store.write(
            lambda c: queries.insert_submissions(c, rows, limit)
        )
        crashpoints.reach("submission-committed")
        for result, (_, method) in zip(results, items, strict=True):
            if isinstance(result, tuple) and result[1]:
                sub = result[0]
                assert sub.next_retry_at is not None
                self.scheduler.push(
                    sub.next_retry_at, sub.seq, sub.id, sub.form_template_id
                )
                self.metrics.submission_created(method)
        return results

    async def _new_submission(
        self, user: User, body: Any, header_key: str | None
    ) -> tuple[queries.NewSubmission, Method]:
        """A new row to insert, and its template's method (for counting)."""
        spec: SubmissionIn = convert(body, SubmissionIn, "submission")
        key = spec.idempotency_key
        if header_key is not None:
            _check_header_key(header_key)
            if key is not None and key != header_key:
                raise BadRequestError(
                    "Idempotency-Key header and idempotency_key differ",
                    code="idempotency_key_mismatch",
                )
            key = header_key
        check_data(spec.data)
        template = await self._template_for_submission(user, spec.form_template_id)
        missing = missing_required(spec.data, template.required_fields)
        if missing:
            raise InvalidError(
                f"required fields missing: {', '.join(missing)}",
                code="missing_required_fields",
                details={"fields": missing},
            )
        now = wall_now()
        due = now
        if spec.scheduled_at is not None:
            due = _scheduled_time(spec.scheduled_at)
        sub = Submission(
            id=new_id(),
            user_id=user.id,
            form_template_id=template.id,
            data=spec.data,
            status=Status.PENDING,
            max_retries=template.max_retries,
            retry_backoff_seconds=template.retry_backoff_seconds,
            retry_backoff_max_seconds=template.retry_backoff_max_seconds,
            retry_jitter=template.retry_jitter,
            next_retry_at=due,
            idempotency_key=key,
            created_at=now,
            updated_at=now,
        )
        request_hash = None
        if key is not None:
            canonical = {
                "form_template_id": spec.form_template_id,
                "data": spec.data,
                "scheduled_at": spec.scheduled_at,
            }
            encoded = msgspec.json.encode(_integral(canonical), order="sorted")
            request_hash = hashlib.sha256(encoded).hexdigest()
        return queries.NewSubmission(sub, request_hash), template.method

    async def _template_for_submission(self, user: User, template_id: str) -> Template:
        try:
            uuid.UUID(template_id)
        except ValueError:
            template = None
        else:
            template = await self.templates.get(template_id)
        if template is None or template.user_id != user.id:
            raise InvalidError(
                "form_template_id names no template of yours",
                code="unknown_template",
            )
        return template

    async def get_submission(self, user: User, submission_id: str) -> Submission:
        found = await self.store.read(
            lambda c: queries.get_submission(c, submission_id, user.id)
        )
        if found is None:
            raise NotFoundError("no such submission")
        return found

    async def list_submissions(
        self,
        user: User,
        *,
        status: Status | None = None,
        template_id: str | None = None,
        before_seq: int | None = None,
        limit: int = 100,
    ) -> tuple[list[Submission], bool]:
        return await self.store.read(
            lambda c: queries.list_submissions(
                c,
                user.id,
                status=status,
                template_id=template_id,
                before_seq=before_seq,
                limit=limit,
            )
        )

    async def list_attempts(self, user: User, submission_id: str) -> list[Any]:
        found = await self.store.read(
            lambda c: queries.list_attempts(c, submission_id, user.id)
        )
        if found is None:
            raise NotFoundError("no such submission")
        return found

    async def retry(self, user: User, submission_id: str) -> Submission:
        now = wall_now()
        sub = await self.store.write(
            lambda c: queries.retry_submission(c, submission_id, user.id, now)
        )
        self.scheduler.push(now, sub.seq, sub.id, sub.form_template_id)
        log.info("submission retried by user", extra={"submission_id": sub.id})
        return sub

    async def stats(self, user: User, since: float) -> Stats:
        now = wall_now()
        return await self.store.read(lambda c: queries.stats(c, user.id, since, now))

    async def cancel(self, user: User, submission_id: str) -> Submission:
        now = wall_now()
        sub = await self.store.write(
            lambda c: queries.cancel_submission(c, submission_id, user.id, now)
        )
        log.info("submission cancelled", extra={"submission_id": sub.id})
        template = await self.templates.get(sub.form_template_id)
        method = template.method.value if template else UNKNOWN_METHOD
        self.metrics.submission_finished(method, Status.CANCELLED.value)
        return sub


def check_data(data: dict[str, Any]) -> None:
    """Refuse data that JSON cannot carry as given, or that nests too deeply.

    Requests over HTTP are JSON already; embedding programs hand in Python
    values, where NaN, bytes or a non-string key would change on the way.
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > MAX_DATA_DEPTH:
            raise InvalidError(
                f"data is nested deeper than {MAX_DATA_DEPTH} levels", code="too_deep"
            )
        if isinstance(container, dict):
            if not all(isinstance(key, str) for key in container):
                raise InvalidError("data keys must be strings", code="invalid")
            values: Any = container.values()
        else:
            values = container
        for value in values:
            if isinstance(value, str | bool | int) or value is None:
                continue
            if isinstance(value, dict | list):
                stack.append((value, depth + 1))
            elif isinstance(value, float):
                if not math.isfinite(value):
                    raise InvalidError("data holds NaN or infinity", code="invalid")
            else:
                raise InvalidError(
                    f"data holds a {type(value).__name__}, which JSON cannot carry",
                    code="invalid",
                )


def _scheduled_time(text: str) -> float:
    try:
        due = parse_time(text)
    except ValueError:
        due = -1.0
    if not 0 <= due <= LATEST_TIME:
        raise InvalidError(
            "scheduled_at must be an RFC 3339 time with a UTC offset,"
            " between 1970 and 9999",
            code="invalid",
        )
    return due


def _require_admin(user: User) -> None:
    if not user.admin:
        raise ForbiddenError("only an admin can manage users")


def _check_encodable(template: Template, payload: dict[str, Any]) -> None:
    encoding = template.target.get("encoding")
    if template.method is Method.HTTP_POST and encoding in ("form", "multipart"):
        try:
            form_pairs(payload)
        except DeliveryError as exc:
            raise InvalidError(exc.message, code="invalid") from exc


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _integral(value: Any) -> Any:
    """JSON numbers as values: 1.0 and 1 are one number, so they hash alike."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value
