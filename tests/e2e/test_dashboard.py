"""The dashboard in Debian's headless Chromium, driven by Playwright, on a real daemon.

Set PTDAEMON_SCREENSHOTS to a folder to keep screenshots of the main views
(the README's pictures come from there).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.e2e.conftest import Api, Reply, Sink

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 15_000
PHONE = {"width": 390, "height": 844}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM.exists(), "Chromium is missing: scripts/setup installs it"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=FLAGS
        )
        try:
            yield launched
        finally:
            await launched.close()


async def open_page(browser: Browser, api: Api, **options: object) -> Page:
    """A page on /ui/ that refuses to load anything from another origin."""
    context = await browser.new_context(**options)  # type: ignore[arg-type]
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    elsewhere: list[str] = []
    page.on(
        "request",
        lambda r: None if r.url.startswith(api.base) else elsewhere.append(r.url),
    )
    page.elsewhere = elsewhere  # type: ignore[attr-defined]
    await page.goto(api.base + "/ui/")
    return page


async def sign_in(page: Page, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#sign-in-form button[type=submit]")
    await expect(page.locator("#tabs")).to_be_visible()


def screenshot_to(name: str) -> Path | None:
    folder = os.environ.get("PTDAEMON_SCREENSHOTS")
    return Path(folder) / name if folder else None


async def keep_screenshot(page: Page, name: str) -> None:
    path = screenshot_to(name)
    if path is not None:
        await page.screenshot(path=str(path), full_page=True)


async def failed_submission(api: Api, sink: Sink) -> tuple[dict, dict]:
    """A template whose destination refuses once (404, final), then accepts."""
    sink.script("/permits", Reply(404, body="no such form"), then=Reply(200))
    template = await api.template(
        name="city-permit",
        method="API",
        target={"url": sink.url("/permits")},
        field_map={"applicant": "full_name"},
        max_retries=0,
    )
    sub = await api.submit(template["id"], {"full_name": "Ada Lovelace"})
    assert (await api.wait_final(sub["id"]))["status"] == "failed"
    return template, sub


async def test_sign_in_see_failure_retry_and_see_it_complete(
    start_daemon, sink, browser
):
    _, api = await start_daemon()
    _, sub = await failed_submission(api, sink)
    page = await open_page(browser, api)

    await expect(page.locator("#sign-in-form")).to_be_visible()
    await sign_in(page, api.token)
    assert await page.evaluate("sessionStorage.getItem('ptdaemon.token')") == api.token
    await page.select_option("#filter-status", "failed")
    card = page.locator(f"li.card[data-id='{sub['id']}']")
    await expect(card.locator(".badge")).to_have_text("failed")
    await expect(card).to_contain_text("city-permit")
    await expect(card).to_contain_text("remote")
    await card.locator("summary").click()
    await expect(card.locator(".attempts li")).to_contain_text("#1 error")
    await keep_screenshot(page, "submissions.png")

    await card.get_by_role("button", name="Retry").click()

    await expect(card.locator(".badge")).to_have_text("completed", timeout=WAIT_MS)
    assert (await api.ok("GET", f"/v1/submissions/{sub['id']}"))["status"] == (
        "completed"
    )
    assert len(sink.seen("/permits")) == 2
    # The token survives a reload of the tab.
    await page.reload()
    await expect(page.locator("#tabs")).to_be_visible()
    assert page.elsewhere == []  # type: ignore[attr-defined]


async def test_field_map_editor_previews_as_you_type_and_saves(
    start_daemon, sink, browser
):
    _, api = await start_daemon()
    template, _ = await failed_submission(api, sink)
    page = await open_page(browser, api)
    await sign_in(page, api.token)

    await page.click("#tabs button[data-view=mapping]")
    await expect(page.locator(".field-path")).to_have_value("full_name")
    sample = '{"full_name": "Ada Lovelace", "address": {"postcode": "N1 9GU"}}'
    await page.fill("#sample", sample)
    preview = page.locator("#preview")
    await expect(preview).to_contain_text('"applicant": "Ada Lovelace"')

    await page.click("#add-row")
    await page.locator(".field-name").nth(1).fill("zip")
    await page.locator(".field-path").nth(1).fill("address.postcode")
    await expect(preview).to_contain_text('"zip": "N1 9GU"')
    await keep_screenshot(page, "field-map.png")
    await page.locator(".field-path").nth(0).fill("address.missing")
    await expect(preview).not_to_contain_text("applicant")
    await page.click("#save-map")

    await expect(page.locator("#map-message")).to_have_text("Saved.")
    saved = await api.ok("GET", f"/v1/templates/{template['id']}")
    assert saved["field_map"] == {
        "applicant": "address.missing",
        "zip": "address.postcode",
    }


async def test_stats_view_shows_counts_and_a_day_chart(start_daemon, sink, browser):
    _, api = await start_daemon()
    template, _ = await failed_submission(api, sink)
    ok = await api.template(
        name="drop-box", method="API", target={"url": sink.url("/ok")}
    )
    for n in range(3):
        sub = await api.submit(ok["id"], {"n": n})
        await api.wait_final(sub["id"])
    page = await open_page(browser, api)
    await sign_in(page, api.token)

    await page.click("#tabs button[data-view=stats]")

    card = page.locator(f"article.card[data-id='{template['id']}']")
    await expect(card).to_contain_text("failed 1")
    await expect(card).to_contain_text("0.0 %")
    await expect(card).to_contain_text("remote 1")
    other = page.locator(f"article.card[data-id='{ok['id']}']")
    await expect(other).to_contain_text("100.0 %")
    bars = other.locator("svg.chart rect.ok")
    assert await bars.count() == 24
    heights = [float(await bars.nth(i).get_attribute("height") or 0) for i in range(24)]
    assert heights[-1] > 0
    assert sum(1 for h in heights if h > 0) == 1
    await keep_screenshot(page, "stats.png")


async def test_dashboard_fits_a_phone_screen(start_daemon, sink, browser):
    _, api = await start_daemon()
    await failed_submission(api, sink)
    page = await open_page(browser, api, viewport=PHONE, is_mobile=True)
    await sign_in(page, api.token)

    for view in ("submissions", "stats", "mapping"):
        await page.click(f"#tabs button[data-view={view}]")
        await expect(page.locator(f"#{view}")).to_be_visible()
        await page.wait_for_load_state("networkidle")
        root = "document.documentElement"
        overflow = await page.evaluate(f"{root}.scrollWidth - {root}.clientWidth")
        assert overflow <= 0, view
        if view == "submissions":
            await expect(page.locator("li.card .badge")).to_have_text("failed")
            await keep_screenshot(page, "phone.png")


async def test_a_wrong_token_is_refused(start_daemon, browser):
    _, api = await start_daemon()
    page = await open_page(browser, api)

    await page.fill("#token", "ptd_not-a-token")
    await page.click("#sign-in-form button[type=submit]")

    await expect(page.locator("#sign-in-error")).to_have_text("That token was refused.")
    await expect(page.locator("#tabs")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('ptdaemon.token')") is None


async def test_cancel_a_scheduled_submission(start_daemon, sink, browser):
    _, api = await start_daemon()
    template = await api.template(
        name="later", method="API", target={"url": sink.url("/later")}
    )
    sub = await api.submit(
        template["id"], {"n": 1}, scheduled_at="2999-01-01T00:00:00Z"
    )
    page = await open_page(browser, api)
    await sign_in(page, api.token)
    await page.select_option("#filter-template", template["id"])
    card = page.locator(f"li.card[data-id='{sub['id']}']")
    await expect(card.locator(".badge")).to_have_text("pending")
    await expect(card.get_by_role("button", name="Retry")).to_have_count(0)

    await card.get_by_role("button", name="Cancel").click()

    await expect(card.locator(".badge")).to_have_text("cancelled")
    await expect(card.get_by_role("button", name="Cancel")).to_have_count(0)
    assert (await api.ok("GET", f"/v1/submissions/{sub['id']}"))["status"] == (
        "cancelled"
    )
    assert sink.seen("/later") == []
