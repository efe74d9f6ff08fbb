"""The playground page (/ui) in a real browser: headless Chromium (Debian's package, which
`make test` installs) driven by Playwright, against served processes. Screenshots go to each
test's output folder."""

from __future__ import annotations

import base64
import io
import threading
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image

from tests.conftest import GUARD_KEYS, chromium


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def open_page(browser):
    """`open_page(url, width)`: the page loaded, with the console errors and the hosts of every
    request it makes recorded on it (`page.console_errors`, `page.hosts`)."""
    contexts = []

    def open_at(url: str, width: int = 1280):
        # (Playwright's waits evaluate strings, which the page's content policy forbids to its own scripts)
        context = browser.new_context(viewport={"width": width, "height": 900}, bypass_csp=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.console_errors, page.hosts = [], set()
        page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
        page.on("pageerror", lambda error: page.console_errors.append(str(error)))
        page.on(
            "request",
            lambda request: page.hosts.add(urlparse(request.url).hostname) if request.url.startswith("http") else None,
        )
        page.goto(f"{url}/ui")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        return page

    yield open_at
    for context in contexts:
        context.close()


def record_statuses(page) -> None:
    """Keep every text the status line shows, and whether a preview appeared."""
    page.evaluate("""() => {
        window.statuses = [];
        new MutationObserver(() => statuses.push(document.querySelector('#status').textContent))
            .observe(document.querySelector('#status'), {childList: true, characterData: true, subtree: true});
        window.previewed = false;
        new MutationObserver(() => { previewed = true; })
            .observe(document.querySelector('#preview'), {attributes: true});
    }""")


def generate(page, cards_before: int) -> None:
    """Click Generate and wait for a new result (a refusal or failure shown instead fails at once)."""
    page.click("#generate")
    page.wait_for_function(
        f"document.querySelectorAll('.card').length > {cards_before} "
        f"|| document.querySelector('#error').textContent !== ''",
        timeout=300_000,
    )
    assert page.inner_text("#error") == ""


@pytest.mark.served
def test_a_generation_shows_progress_a_preview_then_the_image_and_works_again_from_it(server, open_page, tmp_path):
    page = open_page(server.url)
    assert page.input_value("#model") == "tiny-sdxl"
    page.fill("#steps", "12")
    page.select_option("#size", "custom")
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.fill("#seed", "42")
    record_statuses(page)
    generate(page, 0)
    statuses = page.evaluate("window.statuses")
    assert any(text.startswith("Step ") and " of 12" in text for text in statuses), statuses
    assert statuses[-1].startswith("Done: 1 image(s)")
    assert page.evaluate("window.previewed")
    card = page.locator(".card").first
    assert card.get_attribute("data-seed") == "42"
    assert "seed 42 · 256x256 · tiny-sdxl, 12 steps" in card.locator(".meta").inner_text()
    assert card.locator("a").get_attribute("download") == "sdxl-42.png"
    page.screenshot(path=tmp_path / "playground.png", full_page=True)

    card.get_by_text("Use as input").click()  # img2img from the generated image
    assert page.is_visible("#input-image")
    with page.expect_request(lambda request: request.url.endswith("/v1/jobs") and request.method == "POST") as sent:
        generate(page, 1)
    body = sent.value.post_data_json
    assert body["image"].startswith("data:image/png;base64,") and body["strength"] == 0.75 and "mask" not in body
    assert page.locator(".card").count() == 2
    page.locator("[data-compare]").nth(0).check()
    page.locator("[data-compare]").nth(1).check()
    assert page.locator("#compare img").count() == 2
    page.locator(".card").nth(1).get_by_text("Same settings").click()
    assert page.input_value("#seed") == "42" and page.input_value("#width") == "256"

    page.get_by_text("Copy as curl / Python").click()
    page.click("#show-curl")
    assert '"seed": 42' in page.inner_text("#snippet") and "/v1/txt2img" not in page.inner_text("#snippet")  # img2img
    assert page.console_errors == []
    assert page.hosts == {"127.0.0.1"}  # nothing fetched from anywhere else ...
    policy = httpx.get(f"{server.url}/ui", timeout=300).headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy  # ... nor could it be
    # BentoML's API page at / shows the document's description first: it links the playground.
    assert "(/ui)" in httpx.get(f"{server.url}/docs.json", timeout=300).json()["info"]["description"]


@pytest.mark.served
def test_cancel_stops_a_long_job(server, open_page):
    page = open_page(server.url)
    page.fill("#prompt", "a parked one")
    page.fill("#steps", "150")
    record_statuses(page)
    with server.parked():  # (held after its first step until cancelled)
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('Step ')", timeout=300_000)
        page.click("#cancel")
        page.wait_for_function("document.querySelector('#status').textContent === 'Cancelled.'", timeout=300_000)
    job = httpx.get(f"{server.url}/v1/jobs", params={"limit": 1}, timeout=300).json()["jobs"][0]
    assert job["status"] == "cancelled" and job["step"] <= 1  # (held at its first step: it never ran on)
    assert page.is_enabled("#generate") and page.locator(".card").count() == 0


@pytest.mark.served
def test_a_refused_request_shows_the_servers_message_on_its_field(server, open_page):
    page = open_page(server.url)
    page.select_option("#size", "custom")
    page.fill("#width", "100")
    page.fill("#height", "64")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').textContent !== ''")
    assert page.inner_text("#error") == "width: 100 is not a multiple of 8"
    assert "invalid" in page.get_attribute("#width", "class")
    assert page.locator(".card").count() == 0 and page.is_enabled("#generate")


@pytest.mark.served
def test_with_api_keys_the_page_asks_for_one_and_then_works(guarded, browser, tmp_path):
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{guarded.url}/ui")  # the page itself needs no key
    page.wait_for_function("document.querySelector('#error').textContent !== ''")
    assert "needs an API key" in page.inner_text("#error")
    page.fill("#key", GUARD_KEYS[0])
    page.click("#save-key")
    page.wait_for_function("document.querySelector('#error').textContent === ''")
    assert page.locator("#model option").count() > 0
    assert page.evaluate("localStorage.getItem('sdxl-key')") == GUARD_KEYS[0]  # kept in the browser only

    # This server allows one event stream: another client's job holds it, and runs first.
    auth = {"Authorization": f"Bearer {GUARD_KEYS[0]}"}
    with guarded.parked():  # (the other client's job is held after its first step until cancelled)
        long_job = httpx.post(
            f"{guarded.url}/v1/jobs",
            headers=auth,
            timeout=300,
            json={"prompt": "a parked one", "width": 64, "height": 64, "steps": 150},
        ).json()
        watched = threading.Event()

        def watch_long_job():
            with httpx.stream(
                "GET", f"{guarded.url}/v1/jobs/{long_job['id']}/events", headers=auth, timeout=300
            ) as events:
                watched.set()
                for _ in events.iter_lines():
                    pass

        watcher = threading.Thread(target=watch_long_job)
        watcher.start()
        assert watched.wait(300)
        polls = []
        page.on(
            "request",
            lambda request: (
                polls.append(request.url)
                if "/v1/jobs/" in request.url and not request.url.endswith(("/events", "/cancel"))
                else None
            ),
        )
        page.click("#generate")  # its events are refused (429): the page polls the job instead
        page.wait_for_function(
            "document.querySelector('#status').textContent === 'Queued, position 1…'", timeout=300_000
        )
        httpx.post(f"{guarded.url}/v1/jobs/{long_job['id']}/cancel", headers=auth, timeout=300)
    page.wait_for_function("document.querySelectorAll('.card').length === 1", timeout=300_000)
    watcher.join(300)
    assert page.inner_text("#error") == "" and len(polls) >= 2
    context.close()


@pytest.mark.served
@pytest.mark.parametrize("width", [375, 1920])
def test_the_page_fits_a_phone_and_a_wide_screen(server, open_page, width, tmp_path):
    page = open_page(server.url, width)
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # nothing wider than the screen
    form, results = page.locator("#form").bounding_box(), page.locator("section").bounding_box()
    if width < 760:
        assert results["y"] >= form["y"] + form["height"]  # stacked
    else:
        assert results["x"] >= form["x"] + form["width"]  # side by side
    page.screenshot(path=tmp_path / f"playground-{width}.png", full_page=True)
    assert page.locator("[hidden]:visible").count() == 0  # what the page hid (an empty panel) is not shown
    assert page.console_errors == [] and page.hosts == {"127.0.0.1"}


@pytest.mark.served
def test_a_painted_mask_a_lora_a_controlnet_and_an_image_prompt_go_into_the_request(
    side_models_server, open_page, tmp_path
):
    page = open_page(side_models_server.url, 1280)
    picture = tmp_path / "input.png"
    Image.new("RGB", (128, 128), (40, 90, 160)).save(picture)
    page.get_by_text("Image to image, inpainting").click()
    page.set_input_files("#image-file", str(picture))
    page.wait_for_function("document.querySelector('#mask').width === 128")
    page.check("#paint-on")
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    page.click("#lora-panel summary")
    # Only the LoRAs that fit the model are offered (other tests leave one for SDXL base in the store).
    offered = page.locator("#loras > div:visible")
    assert page.locator("[hidden]:visible").count() == 0  # what the page hid is not shown
    assert offered.count() >= 1 and all(
        "tiny-sdxl" in fits.split() for fits in offered.evaluate_all("rows => rows.map(row => row.dataset.fits)")
    )
    page.locator('#loras > div[data-id="tiny-sdxl-lora"] [data-lora]').check()
    page.click("#controlnet-panel summary")
    page.select_option("#controlnet", "tiny-sdxl-controlnet")
    page.set_input_files("#control-file", str(picture))
    page.wait_for_function("document.querySelector('#control-file').files.length === 1")
    page.click("#ip-adapter-panel summary")
    page.select_option("#ip-adapter", "tiny-sdxl-ip-adapter")
    page.set_input_files("#ip-file", str(picture))
    page.wait_for_function("state.picture !== null")  # (read by the page)
    with page.expect_request(lambda request: request.url.endswith("/v1/jobs") and request.method == "POST") as sent:
        generate(page, 0)
    body = sent.value.post_data_json
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",")[1]))).convert("L")
    assert mask.size == (128, 128) and mask.getpixel((64, 64)) == 255 and mask.getpixel((64, 5)) == 0  # the stroke
    assert body["loras"] == [{"id": "tiny-sdxl-lora", "weight": 0.8}]
    assert body["controlnets"][0]["id"] == "tiny-sdxl-controlnet" and body["controlnets"][0]["preprocess"] == "canny"
    (prompt,) = body["ip_adapters"]
    assert (prompt["id"], prompt["scale"]) == ("tiny-sdxl-ip-adapter", 0.6)
    assert prompt["image"].startswith("data:image/png;base64,")
    assert "seed" in page.locator(".card .meta").first.inner_text()  # inpainted, guided, styled, prompted: it ran
    assert page.console_errors == []


@pytest.mark.served
def test_a_result_is_upscaled_by_the_chosen_upscaler_into_a_new_card(side_models_server, open_page):
    page = open_page(side_models_server.url, 1280)
    assert page.is_visible("#upscale-bar") and page.input_value("#upscaler") == "tiny-upscaler"
    page.fill("#width", "64")
    page.fill("#height", "64")
    generate(page, 0)
    with page.expect_request(lambda request: request.url.endswith("/v1/upscale")) as sent:
        page.locator(".card [data-upscale]").first.click()
    page.wait_for_function("document.querySelectorAll('.card').length === 2", timeout=300_000)
    assert sent.value.post_data_json["upscaler"] == "tiny-upscaler" and sent.value.post_data_json["scale"] == 2
    newest = page.locator(".card").first
    assert "128x128 · upscaled 2x by tiny-upscaler" in newest.locator(".meta").inner_text()
    assert newest.locator("img").evaluate("img => img.naturalWidth") == 128
    assert page.inner_text("#error") == "" and page.console_errors == []


@pytest.mark.served
@pytest.mark.parametrize(("path", "filled"), [("/ui", "#model option"), ("/ui/fleet", ".replica")])
def test_the_pages_run_their_own_script_and_no_other(server, browser, path, filled):
    """The content policy allows each page's script by its hash (no 'unsafe-inline'): in a
    browser that applies it, the page's script runs and fills the page, and a script injected
    into the page does not run."""
    context = browser.new_context()
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        answer = page.goto(f"{server.url}{path}")
        script_src = next(
            part
            for part in answer.headers["content-security-policy"].split(";")
            if part.strip().startswith("script-src")
        )
        assert "'sha256-" in script_src and "unsafe" not in script_src
        page.locator(filled).first.wait_for(state="attached", timeout=60_000)
        assert not [error for error in errors if "Content Security Policy" in error]  # (its own script ran)
        with pytest.raises(Exception, match=r"Content Security Policy|CSP|refused"):
            page.add_script_tag(content="document.title = 'injected'")
        assert page.title() != "injected"
        assert [error for error in errors if "Content Security Policy" in error]  # (the injected one was refused)
    finally:
        context.close()
