"""Tests of ptdaemon.retry: backoff arithmetic, Retry-After, and the decision."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from ptdaemon.errors import DeliveryError
from ptdaemon.models import ErrorCategory, Status
from ptdaemon.retry import (
    RETRYABLE_HTTP_STATUSES,
    Decision,
    backoff_delay,
    decide,
    is_retryable_status,
    parse_retry_after,
)

NOW = 1_700_000_000.0


def _error(
    category: ErrorCategory = ErrorCategory.REMOTE,
    *,
    retryable: bool | None = None,
    retry_after_seconds: float | None = None,
) -> DeliveryError:
    return DeliveryError(
        "boom",
        category=category,
        retryable=retryable,
        retry_after_seconds=retry_after_seconds,
    )


class TestRetryableStatus:
    @pytest.mark.parametrize("code", [408, 425, 429, 500, 502, 503, 504, 599])
    def test_transient_statuses(self, code: int) -> None:
        assert is_retryable_status(code)

    @pytest.mark.parametrize("code", [200, 301, 302, 400, 401, 404, 409, 422, 600])
    def test_final_statuses(self, code: int) -> None:
        assert not is_retryable_status(code)

    def test_named_set(self) -> None:
        assert frozenset({408, 425, 429}) == RETRYABLE_HTTP_STATUSES


class TestBackoffDelay:
    @pytest.mark.parametrize("count", range(6))
    def test_doubles_each_retry(self, count: int) -> None:
        assert backoff_delay(count, base=60, cap=86400) == 60 * 2**count

    def test_fractional_base(self) -> None:
        assert backoff_delay(3, base=0.05, cap=10) == pytest.approx(0.4)

    def test_capped(self) -> None:
        assert backoff_delay(20, base=60, cap=86400) == 86400

    @pytest.mark.parametrize("count", [1024, 10**6, 10**30])
    def test_huge_counts_do_not_overflow(self, count: int) -> None:
        assert backoff_delay(count, base=60, cap=86400) == 86400

    def test_no_jitter_ignores_rand(self) -> None:
        def rand() -> float:
            raise AssertionError("rand must not be called without jitter")

        assert backoff_delay(2, base=1, cap=100, rand=rand) == 4

    @pytest.mark.parametrize(
        ("draw", "expected"), [(0.0, 8.0), (0.5, 10.0), (0.999, 11.996)]
    )
    def test_jitter_lengthens_up_to_fraction(
        self, draw: float, expected: float
    ) -> None:
        delay = backoff_delay(3, base=1, cap=100, jitter=0.5, rand=lambda: draw)

        assert delay == pytest.approx(expected)

    def test_jittered_delay_is_capped(self) -> None:
        delay = backoff_delay(3, base=1, cap=9, jitter=1.0, rand=lambda: 0.9)

        assert delay == 9

    def test_jitter_never_shortens_even_past_cap(self) -> None:
        delay = backoff_delay(40, base=1, cap=50, jitter=1.0, rand=lambda: 0.7)

        assert delay == 50

    def test_jitter_above_one_counts_as_one(self) -> None:
        delay = backoff_delay(0, base=10, cap=100, jitter=5.0, rand=lambda: 1.0)

        assert delay == 20

    def test_jitter_bounds_over_many_draws(self) -> None:
        draws = iter([i / 100 for i in range(100)])
        delays = [
            backoff_delay(4, base=2, cap=1000, jitter=0.25, rand=lambda: next(draws))
            for _ in range(100)
        ]

        assert min(delays) == 32
        assert max(delays) < 32 * 1.25


class TestParseRetryAfter:
    @pytest.mark.parametrize(
        ("value", "seconds"), [("0", 0.0), ("5", 5.0), (" 120 ", 120.0), ("1.5", 1.5)]
    )
    def test_seconds(self, value: str, seconds: float) -> None:
        assert parse_retry_after(value, now=NOW) == seconds

    def test_huge_seconds_are_returned_for_the_caller_to_cap(self) -> None:
        assert parse_retry_after(str(10**12), now=NOW) == 10**12

    def test_http_date_in_the_future(self) -> None:
        moment = datetime.fromtimestamp(NOW + 90, UTC)

        value = format_datetime(moment, usegmt=True)

        assert parse_retry_after(value, now=NOW) == pytest.approx(90)

    def test_http_date_in_the_past_is_zero(self) -> None:
        value = "Wed, 21 Oct 2015 07:28:00 GMT"

        assert parse_retry_after(value, now=NOW) == 0.0

    def test_http_date_with_unknown_zone_is_utc(self) -> None:
        moment = datetime.fromtimestamp(NOW + 30, UTC)
        value = moment.strftime("%a, %d %b %Y %H:%M:%S -0000")

        assert parse_retry_after(value, now=NOW) == pytest.approx(30)

    @pytest.mark.parametrize(
        "value", [None, "", "   ", "-1", "-0.5", "garbage", "1.2.3", "5s", "0x10"]
    )
    def test_unreadable_values_are_none(self, value: str | None) -> None:
        assert parse_retry_after(value, now=NOW) is None


class TestDecide:
    def _decide(
        self,
        error: DeliveryError,
        *,
        retry_count: int = 0,
        max_retries: int = 3,
        cap: float = 86400.0,
    ) -> Decision:
        return decide(
            retry_count=retry_count,
            max_retries=max_retries,
            base=60.0,
            cap=cap,
            jitter=0.0,
            error=error,
            now=NOW,
        )

    @pytest.mark.parametrize("count", [0, 1, 2])
    def test_transient_error_with_budget_retries(self, count: int) -> None:
        decision = self._decide(_error(), retry_count=count)

        assert decision == Decision(Status.RETRYING, count + 1, NOW + 60 * 2**count)

    def test_budget_exhausted_fails(self) -> None:
        decision = self._decide(_error(), retry_count=3)

        assert decision == Decision(Status.FAILED, 3, None)

    def test_zero_retries_means_one_attempt(self) -> None:
        decision = self._decide(_error(), max_retries=0)

        assert decision == Decision(Status.FAILED, 0, None)

    @pytest.mark.parametrize(
        "error",
        [
            _error(ErrorCategory.VALIDATION),
            _error(ErrorCategory.REMOTE, retryable=False),
        ],
    )
    def test_permanent_error_fails_at_once(self, error: DeliveryError) -> None:
        decision = self._decide(error, retry_count=1)

        assert decision == Decision(Status.FAILED, 1, None)

    def test_system_errors_are_retried(self) -> None:
        decision = self._decide(_error(ErrorCategory.SYSTEM))

        assert decision.status is Status.RETRYING

    def test_retry_after_later_than_backoff_wins(self) -> None:
        decision = self._decide(_error(retry_after_seconds=600))

        assert decision.next_retry_at == NOW + 600

    def test_retry_after_sooner_than_backoff_is_ignored(self) -> None:
        decision = self._decide(_error(retry_after_seconds=5))

        assert decision.next_retry_at == NOW + 60

    def test_retry_after_past_the_cap_is_capped(self) -> None:
        error = _error(retry_after_seconds=10**12)

        decision = self._decide(error, cap=3600)

        assert decision.next_retry_at == NOW + 3600

    def test_jitter_comes_from_rand(self) -> None:
        decision = decide(
            retry_count=1,
            max_retries=3,
            base=10,
            cap=1000,
            jitter=0.5,
            error=_error(),
            now=NOW,
            rand=lambda: 1.0,
        )

        assert decision.next_retry_at == NOW + 30
