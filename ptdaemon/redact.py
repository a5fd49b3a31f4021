"""What counts as a secret, and how secrets are hidden in answers."""

from __future__ import annotations

from typing import Any, Final

MASK: Final = "***"
SENSITIVE_HEADER_WORDS: Final = ("auth", "key", "token", "secret", "password", "cookie")


def is_sensitive_header(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SENSITIVE_HEADER_WORDS)


def mask_target(target: dict[str, Any]) -> dict[str, Any]:
    """A target as responses show it: every secret replaced by `***`."""
    masked = dict(target)
    auth = masked.get("auth")
    if isinstance(auth, dict):
        masked["auth"] = {
            k: (MASK if k in ("token", "password", "value") else v)
            for k, v in auth.items()
        }
    headers = masked.get("headers")
    if isinstance(headers, dict):
        masked["headers"] = {
            k: (MASK if is_sensitive_header(k) else v) for k, v in headers.items()
        }
    return masked


def masked_places(target: Any) -> list[str]:
    """Secret places of a target that still say `***` (nothing stored there)."""
    if not isinstance(target, dict):
        return []
    masked = mask_target(target)
    places: list[str] = []
    for section in ("auth", "headers"):
        values, shown = target.get(section), masked.get(section)
        if isinstance(values, dict) and isinstance(shown, dict):
            places.extend(
                f"target.{section}.{key}"
                for key, value in values.items()
                if value == MASK and shown.get(key) == MASK
            )
    return places


def unmask_target(new: Any, old: dict[str, Any]) -> Any:
    """Put stored secrets back where a patch left `***` in their place."""
    if not isinstance(new, dict):
        return new
    result = dict(new)
    auth, old_auth = result.get("auth"), old.get("auth")
    if isinstance(auth, dict) and isinstance(old_auth, dict):
        result["auth"] = {
            k: (old_auth.get(k, v) if v == MASK else v) for k, v in auth.items()
        }
    headers, old_headers = result.get("headers"), old.get("headers")
    if isinstance(headers, dict) and isinstance(old_headers, dict):
        result["headers"] = {
            k: (old_headers.get(k, v) if v == MASK else v) for k, v in headers.items()
        }
    return result
