"""The dashboard at /dashboard, served by Envoy, driven by Debian's Chromium through Playwright:
sign up, see $10, create a key, call with it, see the call's cost appear, request an upgrade,
add a card with the Stripe.js stand-in of localstripe and top up $5, see the balance and the
history change and the keys become Paid, revoke a key. Screenshots of every page, at laptop
(1280x800) and phone (390x844) sizes, go to test-output/dashboard/.

The session cookie's CSRF defences are checked over plain HTTP as well.
"""
import os
import pathlib
import re
import shutil
import tempfile
import uuid

import httpx
import pytest

from common import money
from devtool import up
from tests.e2e.conftest import PASSWORD, assert_openai_error, eventually, mesh_config, signup

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-output" / "dashboard"
CHROMIUM = os.environ.get("TOKENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# A settled call shows up in the usage the dashboard polls (every 3 s) within this.
CALL_SHOWS_MS = 20_000
TOPUP_MS = 30_000


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    instance = up.Mesh(mesh_config(tmp_path_factory.mktemp("dashboard-mesh")))
    instance.start()
    yield instance
    instance.stop()


# Over plain HTTP: the files, and the session cookie's defences

def test_the_dashboard_is_served_by_envoy_with_a_strict_policy(base_url):
    for path in ("/dashboard", "/dashboard/", "/dashboard/billing", "/dashboard/keys"):
        page = httpx.get(f"{base_url}{path}", timeout=10)
        assert page.status_code == 200, (path, page.status_code)
        assert page.headers["content-type"].startswith("text/html"), page.headers
        assert '<script src="/dashboard/app.js" defer></script>' in page.text
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, policy
    script = httpx.get(f"{base_url}/dashboard/app.js", timeout=10)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{base_url}/dashboard/app.css", timeout=10).headers["content-type"].startswith("text/css")
    # No CDN, no inline script: everything the page runs is ours (and Stripe.js, loaded on demand).
    html = httpx.get(f"{base_url}/dashboard", timeout=10).text
    assert not re.search(r"<script(?![^>]*\bsrc=\"/dashboard/)", html), "an inline or foreign script"
    assert "http" not in re.sub(r"http://www\.w3\.org/2000/svg", "", html)


def test_the_session_cookie_is_httponly_strict_and_writes_with_it_need_json(base_url):
    customer = signup(base_url)
    login = httpx.post(f"{base_url}/v1/sessions", json={"email": customer.email, "password": PASSWORD}, timeout=30)
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie, cookie
    token = login.json()["session_token"]
    jar = {"Cookie": f"ts_session={token}"}
    # Reads with the cookie alone work.
    assert httpx.get(f"{base_url}/v1/keys", headers=jar, timeout=10).status_code == 200
    # What another site's form could send: a cookie and a form (or text) body. Refused, before anything runs.
    for content_type, body in (("application/x-www-form-urlencoded", "name=csrf"), ("text/plain", '{"name": "x"}'),
                               ("multipart/form-data; boundary=x", "--x--"), (None, None)):
        headers = dict(jar, **({"Content-Type": content_type} if content_type else {}))
        reply = httpx.post(f"{base_url}/v1/keys", headers=headers, content=body, timeout=10)
        assert reply.status_code == 403, (content_type, reply.status_code, reply.text)
        assert reply.json()["error"]["code"] == "csrf_check_failed", reply.text
    revoke = httpx.delete(f"{base_url}/v1/keys/{customer.key_id}", headers=jar, timeout=10)
    assert revoke.status_code == 403, revoke.text
    topup = httpx.post(f"{base_url}/v1/billing/topups", headers=dict(jar, **{"Content-Type": "text/plain"}),
                       content='{"amount_usd": "5.00", "payment_method": "pm_card_visa"}', timeout=10)
    assert topup.status_code == 403, topup.text
    keys = httpx.get(f"{base_url}/v1/keys", headers=jar, timeout=10).json()["data"]
    assert [k["id"] for k in keys] == [customer.key_id], keys
    # The dashboard's own calls (JSON) pass; a session token as a bearer is no cookie: no check.
    made = httpx.post(f"{base_url}/v1/keys", headers=jar, json={"name": "from the dashboard"}, timeout=10)
    assert made.status_code == 200, made.text
    bearer = httpx.post(f"{base_url}/v1/keys", headers={"Authorization": f"Bearer {token}"}, content="", timeout=10)
    assert bearer.status_code == 200, bearer.text
    # An API key is no session at all: keys are managed by a person.
    assert_openai_error(httpx.post(f"{base_url}/v1/keys", headers=customer.auth, json={}, timeout=10), 403,
                        "session_required")


# In Chromium

def _chromium_or_skip() -> str:
    path = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if path is None:
        pytest.skip(f"needs Debian's Chromium at {CHROMIUM}: `apt-get install chromium` "
                    "(./dev test installs it when it runs as root), or set TOKENS_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def browser(mesh):
    executable = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="tokens-chromium-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS, viewport=LAPTOP)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


class Shots:
    """Each page at laptop size (the page under test) and at phone size (a second tab)."""

    def __init__(self, context, page) -> None:
        self.context = context
        self.page = page
        self.count = 0
        SHOTS.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, ready: str) -> None:
        self.count += 1
        stem = f"{self.count:02d}-{name}"
        self.page.screenshot(path=str(SHOTS / f"{stem}-laptop.png"), full_page=True)
        phone = self.context.new_page()
        try:
            phone.set_viewport_size(PHONE)
            phone.goto(self.page.url)
            phone.wait_for_selector(ready, state="visible")
            phone.wait_for_load_state("networkidle")
            phone.screenshot(path=str(SHOTS / f"{stem}-phone.png"), full_page=True)
        finally:
            phone.close()


def _shown_usd(exact: str) -> str:
    """The dashboard's rendering of an amount: two decimals, cut toward zero."""
    whole, _, frac = exact.partition(".")
    return f"${int(whole):,}.{(frac + '00')[:2]}"


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_a_customer_signs_up_calls_tops_up_and_manages_keys_in_the_dashboard(browser, base_url, mesh):
    from playwright.sync_api import expect

    errors: list[str] = []
    page = browser.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The browser logs every 401 it receives (the signed-out page asks who is there): those are not errors.
    page.on("console", lambda message: errors.append(message.text)
            if message.type == "error" and "Failed to load resource" not in message.text else None)
    shot = Shots(browser, page)
    email = f"dash-{uuid.uuid4().hex[:10]}@example.com"
    links = up.VerificationLinks(mesh.config.data_dir / "emails")

    # Sign up: $10 and a first key, shown once.
    page.goto(f"{base_url}/dashboard")
    expect(page.locator("#auth-submit")).to_have_text("Create account")
    shot("signup", "#auth-form")
    page.fill("#auth-email", email)
    page.fill("#auth-password", PASSWORD)
    page.click("#auth-submit")
    expect(page.locator("#welcome")).to_be_visible()
    expect(page.locator("#welcome-credit")).to_have_text("$10.00 of free")
    first_key = page.locator("#welcome-key").inner_text().strip()
    assert first_key.startswith("tsk_"), first_key
    page.screenshot(path=str(SHOTS / "02-welcome-laptop.png"))
    shot.count += 1
    page.click("#welcome-done")
    # Not verified yet: the dashboard says so; the mailed link (here in the mesh's .eml outbox) verifies.
    expect(page.locator("#verify-banner")).to_be_visible()
    expect(page.locator("#verify-email")).to_have_text(email)
    token = eventually(lambda: [link for address, link in links.new() if address == email],
                       "the verification link", 15)[0].rsplit("#", 1)[1]
    page.goto(f"{base_url}/dashboard/verify#{token}")
    expect(page.locator("#flash")).to_contain_text("is verified")
    expect(page.locator("#verify-banner")).to_be_hidden()
    assert page.url == f"{base_url}/dashboard"
    expect(page.locator("#balance")).to_have_text("$10.00")
    expect(page.locator("#tier")).to_have_text("Free")
    expect(page.locator("#calls-empty")).to_be_visible()
    shot("overview-new", "#balance")

    # A key, created and shown once.
    page.click("nav >> text=API keys")
    expect(page).to_have_url(f"{base_url}/dashboard/keys")
    page.fill("#key-name", "laptop")
    page.click("#create-key button[type=submit]")
    expect(page.locator("#new-secret")).to_be_visible()
    secret = page.locator("#new-secret-value").inner_text().strip()
    assert secret.startswith("tsk_") and secret != first_key
    expect(page.locator("#keys tbody tr")).to_have_count(2)
    shot("keys-created", "#keys")

    # A call with the key the page showed; its cost shows up on the overview by itself.
    reply = httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"}, timeout=30,
                       json={"model": "ref-chat", "max_tokens": 20,
                             "messages": [{"role": "user", "content": "[[tokens=20]] Hello from the browser test"}]})
    assert reply.status_code == 200, reply.text
    cost = reply.json()["usage"]["cost"]
    request_id = reply.headers["x-request-id"]
    page.click("nav >> text=Overview")
    row = page.locator(f'#calls tr[data-request="{request_id}"]')
    expect(row).to_be_visible(timeout=CALL_SHOWS_MS)
    expect(row.locator("td.cost")).to_have_text(f"${cost}")
    expect(row).to_contain_text("laptop")
    expect(page.locator("#chart svg rect")).not_to_have_count(0)
    expect(page.locator("#chart-legend")).to_contain_text("ref-chat")
    after_call = money.usd(10 * money.NANOS_PER_USD - money.parse_usd(cost))
    expect(page.locator("#balance-detail")).to_contain_text(f"${after_call}")
    shot("overview-after-a-call", f'#calls tr[data-request="{request_id}"]')

    # An upgrade request: pending until an operator approves it.
    page.click("nav >> text=Limits")
    expect(page.locator("#tiers tr.current")).to_contain_text("Free")
    page.fill("#upgrade-reason", "A support chatbot for our shop")
    page.click("#upgrade-form button[type=submit]")
    expect(page.locator("#upgrade-message")).to_contain_text("pending review")
    shot("limits-upgrade-requested", "#upgrade-message")

    # A card through Stripe.js (localstripe's stand-in), then a $5 top-up.
    page.click("nav >> text=Billing")
    expect(page).to_have_url(f"{base_url}/dashboard/billing")
    expect(page.locator("#billing-balance")).to_have_text(_shown_usd(after_call))
    expect(page.locator("#topups-empty")).to_be_visible()
    page.click("text=Add payment method")
    card = page.locator("#card-element")
    expect(card.locator('input[placeholder="number"]')).to_be_visible()
    shot_card_form = SHOTS / "07-billing-card-form-laptop.png"
    card.locator('input[placeholder="number"]').fill("4242424242424242")
    card.locator('input[placeholder="exp_month"]').fill("12")
    card.locator('input[placeholder="exp_year"]').fill("30")
    card.locator('input[placeholder="cvc"]').fill("123")
    card.locator('input[placeholder="postal_code"]').fill("10115")
    page.screenshot(path=str(shot_card_form), full_page=True)
    shot.count += 1
    page.click("#save-card")
    expect(page.locator("#cards li")).to_have_count(1)
    expect(page.locator("#cards")).to_contain_text("4242")
    expect(page.locator("#flash")).to_contain_text("saved")

    page.fill("#topup-amount", "5.00")
    page.click("#topup-submit")
    expect(page.locator("#flash")).to_contain_text("$5.00 added to your balance", timeout=TOPUP_MS)
    topped = money.usd(15 * money.NANOS_PER_USD - money.parse_usd(cost))
    expect(page.locator("#billing-balance")).to_have_text(_shown_usd(topped))
    history = page.locator("#topups tbody tr")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text("$5.00")
    expect(history.first).to_contain_text("Succeeded")
    expect(history.first).to_contain_text("4242")
    shot("billing-topped-up", "#topups tbody tr")

    # The first top-up moved the keys to Paid.
    page.click("nav >> text=Limits")
    expect(page.locator("#tiers tr.current")).to_contain_text("Paid")
    expect(page.locator("#upgrade-message")).to_contain_text("Paid tier (300 requests per minute)")
    shot("limits-paid", "#tiers tr.current")
    page.click("nav >> text=Overview")
    expect(page.locator("#tier")).to_have_text("Paid")
    expect(page.locator("#balance-detail")).to_contain_text(f"${topped}")

    # Revoke the key the test called with: two clicks, and it stops working.
    page.click("nav >> text=API keys")
    laptop_row = page.locator("#keys tbody tr", has_text="laptop")
    laptop_row.locator("button").click()
    expect(laptop_row.locator("button")).to_have_text("Confirm revoke")
    laptop_row.locator("button").click()
    expect(page.locator("#keys tbody tr")).to_have_count(1)
    expect(page.locator("#flash")).to_contain_text("revoked")
    shot("keys-revoked", "#keys")
    refused = httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"}, timeout=30,
                         json={"model": "ref-chat", "messages": [{"role": "user", "content": "Hi"}]})
    assert refused.status_code == 401, refused.text

    # Log out: the cookie goes, and the dashboard asks to log in again.
    page.click("#logout")
    expect(page.locator("#auth")).to_be_visible()
    page.goto(f"{base_url}/dashboard/billing")
    expect(page.locator("#auth-form")).to_be_visible()
    assert errors == [], errors
