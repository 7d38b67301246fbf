"""The web page in a real headless Chromium, and the viewer API behind it.

The API runs in embedded mode (in-process worker, no broker) on a free port
with an API key; jobs are the tiny phantom pair (24^3 voxels of 4 mm) with
MIND-SSC and 10 starts, so each takes a few seconds. The browser is the Debian
chromium driven by Playwright for Python (never `playwright install`).
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from disa.service.client import DisaClient

from .helpers import (
    ADMIN_KEY,
    API_KEY,
    OTHER_KEY,
    TINY_OPTIONS,
    api_key_env,
    click_pixel,
    enter_key,
    live_service,
    open_tab,
    service_env,
)

pytestmark = pytest.mark.timeout(180)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
HEADERS = {"X-API-Key": API_KEY}
PLANES = ("axial", "coronal", "sagittal")


# -------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`disa serve` as one process: API + embedded worker, API key required."""
    env = {**service_env(tmp_path_factory.mktemp("jobs")), **api_key_env()}
    with live_service(env) as url:
        yield url


@pytest.fixture(scope="module")
def jobs_dir(site: str) -> Path:
    from disa.jobs.settings import get_settings

    return Path(get_settings().jobs_dir)


@pytest.fixture(scope="module")
def done_job(site: str, pair_files: tuple[Path, Path]) -> dict:
    """A succeeded job submitted with the Python client."""
    with DisaClient(site, api_key=API_KEY) as client:
        job = client.submit(*pair_files, TINY_OPTIONS)
        job = client.wait(job["id"], poll_s=0.2, timeout_s=120)
    assert job["state"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian packages chromium, chromium-driver)")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, site: str) -> Iterator:
    """A fresh browser context (fresh sessionStorage) on the page; console errors collected."""
    context, tab = open_tab(browser, site)
    yield tab
    context.close()


def _api(site: str, path: str, **params) -> httpx.Response:
    return httpx.get(f"{site}{path}", params=params, headers=HEADERS, timeout=60)


def _png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int32)


def _wait_rendered(page, selector: str, before: int, timeout: float = 20.0) -> int:
    """Wait until the canvas's render counter passes `before`; return the new count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = int(page.get_attribute(selector, "data-rendered") or 0)
        if count > before:
            return count
        time.sleep(0.05)
    pytest.fail(f"{selector} was not redrawn")


# ----------------------------------------------------------------- the page


def test_upload_progress_viewer_point_and_heatmaps(page, site, pair_files):
    from disa.model.card import default_card_path

    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    page.set_input_files("#fixed", str(pair_files[0]))
    page.set_input_files("#moving", str(pair_files[1]))
    page.select_option("#opt-similarity", "mind")
    page.fill("#opt-starts", "10")
    page.fill("#opt-seed", "2")
    page.click("#submit")

    page.wait_for_selector("#result[data-state=succeeded]", timeout=90_000)
    job_id = page.get_attribute("#result", "data-job")
    job = _api(site, f"/v1/jobs/{job_id}").json()
    assert job["options"]["starts"] == 10 and job["options"]["seed"] == 2
    assert job["options"]["similarity"] == "mind"
    page.wait_for_selector(f"#announcer:has-text('Job {job_id[:8]}: succeeded')")
    # the result view has its own address; the verdict comes first, with its evidence
    assert page.evaluate("() => location.pathname") == f"/jobs/{job_id}"
    verdict = page.locator("#verdict")
    verdict.wait_for()
    assert verdict.get_attribute("data-verdict") == job["result"]["verdict"]
    assert job["result"]["verdict_evidence"] in verdict.text_content()
    assert "Confidence" not in page.text_content("#result")
    downloads = page.locator("#downloads button").all_text_contents()
    assert downloads == [f"Download {name}" for name in job["files"]]
    with page.expect_download() as caught:
        page.click("#downloads button[data-file='result.json']")
    saved = json.loads(Path(caught.value.path()).read_text())
    assert saved["matrix_fixed_to_moving"] == job["result"]["matrix_fixed_to_moving"]

    # the viewer: three planes drawn, not blank
    page.wait_for_selector(f"#result[data-viewer-ready='{job_id}']", timeout=30_000)
    moving = "figure[data-plane=axial] canvas.moving-view"
    for plane in PLANES:
        shot = _png_array(page.locator(f"figure[data-plane={plane}] canvas.fixed-view")
                          .screenshot())
        assert shot.std() > 20, f"{plane} fixed view is blank"

    # every comparison mode and the before/after toggle draw different pixels
    shots = {}
    count = int(page.get_attribute(moving, "data-rendered"))
    for mode in ("moving", "checkerboard", "edges", "blend", "fusion"):
        page.check(f"#display-form input[name=overlay][value={mode}]")
        count = _wait_rendered(page, moving, count)
        shots[mode] = _png_array(page.locator(moving).screenshot())
        assert shots[mode].std() > 20, f"{mode} view is blank"
    modes = list(shots)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert np.abs(shots[a] - shots[b]).mean() > 1.0, f"{a} and {b} look the same"
    page.check("#display-form input[name=stage][value=before]")
    count = _wait_rendered(page, moving, count)
    before = _png_array(page.locator(moving).screenshot())
    assert np.abs(before - shots["fusion"]).mean() > 1.0
    page.check("#display-form input[name=stage][value=after]")
    count = _wait_rendered(page, moving, count)

    # a click on the fixed axial view marks p; T(p) is the job's matrix applied to it
    viewer = _api(site, f"/v1/jobs/{job_id}/viewer").json()
    axial = viewer["planes"]["axial"]
    column, row_ = 8, 14
    click_pixel(page, "figure[data-plane=axial] canvas.fixed-view", axial, column, row_)
    index = int(page.input_value("#slice-axial"))
    expected_p = np.array(axial["pixel_to_physical"]) @ [column, row_, index, 1.0]
    p = np.array(json.loads(page.get_attribute("#point-info", "data-fixed")))
    np.testing.assert_allclose(p, expected_p[:3], atol=1e-6)
    matrix = np.array(job["result"]["matrix_fixed_to_moving"])
    moved = np.array(json.loads(page.get_attribute("#point-info", "data-moving")))
    np.testing.assert_allclose(moved, (matrix @ np.append(p, 1.0))[:3], atol=1e-6)
    info = page.text_content("#point-info")
    assert "T(p) = (" + ", ".join(f"{v:.1f}" for v in moved) + ") mm (LPS)" in info
    assert "(" + ", ".join(f"{v:.1f}" for v in p) + ") mm (LPS)" in info

    # the keyboard moves the point one pixel (4 mm) to the right of the screen: +x (L)
    page.locator("figure[data-plane=axial] canvas.fixed-view").focus()
    page.keyboard.press("ArrowRight")
    deadline = time.monotonic() + 10
    while json.loads(page.get_attribute("#point-info", "data-fixed"))[0] == p[0]:
        assert time.monotonic() < deadline, "ArrowRight did not move the point"
        time.sleep(0.05)
    p2 = np.array(json.loads(page.get_attribute("#point-info", "data-fixed")))
    np.testing.assert_allclose(p2 - p, [4.0, 0.0, 0.0], atol=1e-6)

    # heatmaps: MIND-SSC drawn; DISA drawn or, without its model, its 409 message shown
    page.wait_for_selector("#heatmap-mind[data-state=ready]", timeout=30_000)
    assert _png_array(page.locator("#heatmap-mind").screenshot()).std() > 20
    if default_card_path() is None:
        page.wait_for_selector("#heatmap-disa[data-state=error]", timeout=30_000)
        assert "DISA model" in page.text_content("#heatmap-disa-status")
    else:
        page.wait_for_selector("#heatmap-disa[data-state=ready]", timeout=60_000)
    status = page.text_content("#heatmap-mind-status")
    assert "this slice" in status and "local peak" in status, status
    assert page.text_content("#heatmap-mind-high") != ""  # the colour bar's scale
    assert page.errors == []


def test_keyboard_and_screen_reader_basics(page):
    # every form control has a label
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(el => el.type !== 'hidden')
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                      && !el.getAttribute('aria-labelledby'))
        .map(el => el.id || el.name || el.outerHTML.slice(0, 80))""")
    assert unlabelled == []
    # Tab reaches the key, the files, the options and submit, in this order
    expected = ["api-key", "key-save", "key-forget", "fixed", "moving", "fixed_mask",
                "moving_mask", "initial_transform", "opt-mode", "opt-similarity",
                "opt-starts", "opt-seed", "opt-rotation", "opt-translation", "submit"]
    page.focus("#api-key")
    seen = ["api-key"]
    for _ in range(30):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("() => document.activeElement.id"))
        if seen[-1] == "submit":
            break
    assert [s for s in seen if s in expected] == expected
    # actions are real buttons with names; nothing fakes one
    fakes = page.evaluate("""() => [...document.querySelectorAll(
        '[role=button], [onclick], div[tabindex], span[tabindex], a:not([href])')].length""")
    assert fakes == 0
    nameless = page.evaluate("""() => [...document.querySelectorAll('button')]
        .filter(b => !(b.textContent.trim() || b.getAttribute('aria-label'))).length""")
    assert nameless == 0
    assert page.evaluate("() => [...document.querySelectorAll('button')]"
                         ".every(b => b.getAttribute('type'))")
    # job progress is announced through a polite live region; the page has a language
    assert page.get_attribute("#announcer", "aria-live") == "polite"
    assert page.get_attribute("html", "lang") == "en"
    assert page.locator("h1").count() == 1
    # Enter in the key field keeps the key for this tab only
    page.fill("#api-key", "some-key")
    page.keyboard.press("Enter")
    assert page.evaluate("() => sessionStorage.getItem('disa.apiKey')") == "some-key"


def test_page_reports_a_missing_key(page):
    page.locator("#jobs-status", has_text="API key").wait_for(timeout=10_000)


def test_client_side_refusal_replaces_an_earlier_reason(page, pair_files, tmp_path):
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    page.set_input_files("#fixed", str(text))
    page.set_input_files("#moving", str(pair_files[1]))
    page.click("#submit")
    page.locator("#upload-status", has_text="unsupported file type").wait_for(timeout=10_000)
    # the file is fixed, but starts is out of range: the browser refuses, the page says why
    page.set_input_files("#fixed", str(pair_files[0]))
    page.fill("#opt-starts", "0")
    page.click("#submit")
    status = page.text_content("#upload-status")
    assert "unsupported file type" not in status
    assert status.startswith("Not submitted: Random starts: ")
    assert page.evaluate("() => document.activeElement.id") == "opt-starts"


def test_a_non_linear_initial_transform_is_refused_with_the_apis_reason(page, pair_files,
                                                                       tmp_path):
    import SimpleITK as sitk

    assert page.get_attribute("#initial_transform", "accept") == ".tfm,.txt"
    bspline = tmp_path / "warp.tfm"
    sitk.WriteTransform(sitk.BSplineTransformInitializer(
        sitk.Image([8, 8, 8], sitk.sitkFloat32), [3, 3, 3]), str(bspline))
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    page.set_input_files("#fixed", str(pair_files[0]))
    page.set_input_files("#moving", str(pair_files[1]))
    page.set_input_files("#initial_transform", str(bspline))
    page.click("#submit")
    page.locator("#upload-status", has_text="BSplineTransform is not a linear transform"
                 ).wait_for(timeout=10_000)
    assert page.text_content("#upload-status").startswith(
        "Not submitted: initial transform (initial_transform.tfm): ")
    assert page.errors == []


def test_cancel_or_delete_refusal_stays_shown(page, done_job):
    job_id = done_job["id"]
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    row = page.locator(f"#jobs-body tr[data-id='{job_id}']")
    row.wait_for(timeout=10_000)

    def refuse_delete(route):
        if route.request.method == "DELETE":
            route.fulfill(status=409, content_type="application/json",
                          body=json.dumps({"detail": "job is busy; try again"}))
        else:
            route.continue_()

    page.route(f"**/v1/jobs/{job_id}", refuse_delete)
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_response(lambda r: "/v1/jobs?limit=" in r.url):
        row.locator(".job-action").click()
    page.wait_for_timeout(300)
    # the list refreshes after the action and on its timer: the reason must survive both
    with page.expect_response(lambda r: "/v1/jobs?limit=" in r.url):
        page.click("#jobs-refresh")
    page.wait_for_timeout(300)
    status = page.text_content("#jobs-status")
    assert status == f"Job {job_id[:8]} not deleted: job is busy; try again"
    assert row.is_visible()


def _page_with_key(browser, site: str, key: str):
    """A fresh tab on the page with `key` entered; the caller closes its context."""
    context, tab = open_tab(browser, site)
    enter_key(tab, key)
    return context, tab


def _listed(tab) -> set[str]:
    return set(tab.eval_on_selector_all("#jobs-body tr", "rows => rows.map(r => r.dataset.id)"))


def test_each_key_sees_only_its_own_jobs_on_the_page(browser, site, done_job, pair_files):
    with DisaClient(site, api_key=OTHER_KEY) as client:
        theirs = client.submit(*pair_files, TINY_OPTIONS)["id"]
    mine = done_job["id"]
    for key, expected in ((API_KEY, {mine}), (OTHER_KEY, {theirs}),
                          (ADMIN_KEY, {mine, theirs})):
        context, tab = _page_with_key(browser, site, key)
        try:
            for job_id in expected:
                tab.locator(f"#jobs-body tr[data-id='{job_id}']").wait_for(timeout=10_000)
            assert _listed(tab) & {mine, theirs} == expected, key
            assert tab.errors == []
        finally:
            context.close()
    # another key's job by its address: the page shows the API's 404, nothing of the job
    context, tab = _page_with_key(browser, site, API_KEY)
    try:
        tab.goto(f"{site}/#job={theirs}")
        tab.locator("#result-error", has_text="no such job").wait_for(timeout=10_000)
        assert tab.get_attribute("#result", "data-state") is None
    finally:
        context.close()


def test_the_cancel_button_posts_to_the_cancel_route(page):
    job_id = "c" * 32
    stamp = "2026-01-01T00:00:00Z"
    job = {"id": job_id, "owner": "sha256:0", "state": "queued", "created_at": stamp,
           "updated_at": stamp, "started_at": None, "finished_at": None,
           "progress": {"stage": "queued", "fraction": 0.0}, "attempts": 0,
           "cancel_requested": False, "options": {}, "inputs": {},
           "timings": {"queued_s": None, "run_s": None, "stages": {}}, "result": None,
           "error": None, "error_kind": None, "files": []}
    page.route("**/v1/jobs?limit=*", lambda route: route.fulfill(
        status=200, content_type="application/json",
        body=json.dumps({"items": [job], "total": 1, "offset": 0, "limit": 50})))
    requests: list[tuple[str, str]] = []

    def answer(route):
        requests.append((route.request.method, route.request.url))
        route.fulfill(status=202, content_type="application/json",
                      body=json.dumps({**job, "state": "cancelled", "cancel_requested": True}))

    page.route(f"**/v1/jobs/{job_id}/cancel", answer)
    page.route(f"**/v1/jobs/{job_id}", answer)
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    action = page.locator(f"#jobs-body tr[data-id='{job_id}'] .job-action")
    action.wait_for(timeout=10_000)
    assert action.text_content() == "Cancel"
    action.click()
    page.locator("#jobs-status", has_text="cancel requested").wait_for(timeout=10_000)
    assert [(method, url.rsplit("/v1/", 1)[1]) for method, url in requests] == [
        ("POST", f"jobs/{job_id}/cancel")]
    assert page.errors == []


def test_the_api_docs_render_from_this_server_alone(browser, site):
    context = browser.new_context()
    tab = context.new_page()
    foreign: list[str] = []
    refused: list[str] = []
    tab.on("request", lambda r: None if r.url.startswith(site) else foreign.append(r.url))
    tab.on("console", lambda m: refused.append(m.text)
           if "Content Security Policy" in m.text else None)
    try:
        tab.goto(f"{site}/docs")
        tab.locator(".opblock-summary-path", has_text="/v1/jobs/{job_id}/cancel").first.wait_for(
            timeout=30_000)
        assert tab.locator(".opblock").count() >= 10
        # open an operation and its "Try it out" form: more of Swagger UI draws then
        tab.locator(".opblock-summary", has_text="/v1/jobs/{job_id}/cancel").first.click()
        tab.locator(".try-out__btn").first.click()
        job_field = tab.locator(".opblock-body input[placeholder='job_id']").first
        job_field.fill("0" * 32)
        tab.locator(".opblock-body .execute").first.click()  # a request from the docs page
        tab.locator(".live-responses-table .response-col_status", has_text="401").first.wait_for(
            timeout=10_000)  # no key given in the docs: the API's own answer came back
        tab.locator(".models").first.scroll_into_view_if_needed()
        assert foreign == [] and refused == []
    finally:
        context.close()


def test_viewer_of_a_job_left_while_loading_stays_out(page, site, done_job, pair_files):
    """Job A's viewer still loading when the user opens job B must not take over B's viewer."""
    with DisaClient(site, api_key=API_KEY) as client:
        other = client.wait(client.submit(*pair_files, {**TINY_OPTIONS, "seed": 5})["id"],
                            poll_s=0.2, timeout_s=120)
    assert other["state"] == "succeeded", other["error"]
    a, b = done_job["id"], other["id"]
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    held = []  # A's geometry comes late: its request is held until B's viewer is ready
    page.route(f"**/v1/jobs/{a}/viewer", lambda route: held.append(route))
    page.evaluate(f"() => {{ location.hash = 'job={a}'; }}")
    deadline = time.monotonic() + 30
    while not held:
        assert time.monotonic() < deadline, "job A's viewer was not requested"
        page.wait_for_timeout(50)
    page.evaluate(f"() => {{ location.hash = 'job={b}'; }}")
    page.wait_for_selector(f"#result[data-viewer-ready='{b}']", timeout=30_000)
    with page.expect_response(f"**/v1/jobs/{a}/viewer"):
        held[0].continue_()
    page.wait_for_timeout(500)
    assert page.get_attribute("#result", "data-job") == b
    assert page.get_attribute("#result", "data-viewer-ready") == b
    # B's planes are still there, drawn, and the slice slider still redraws them
    fixed = "figure[data-plane=axial] canvas.fixed-view"
    count = int(page.get_attribute(fixed, "data-rendered") or 0)
    assert count > 0
    page.fill("#slice-axial", "3")
    _wait_rendered(page, fixed, count, timeout=10)
    assert page.errors == []


def test_viewer_starts_at_the_view_point(page, site, done_job):
    """The first slices pass through GET .../viewer's view_point_mm (qa.png's planes), not
    the middle ones: here a point moved off the middle on every axis by the test."""
    job_id = done_job["id"]
    geometry = _api(site, f"/v1/jobs/{job_id}/viewer").json()
    index = np.array([5.0, 17.0, 3.0, 1.0])  # fixed grid (i, j, k); the middle is 11.5
    point = (np.array(geometry["index_to_physical"]) @ index)[:3].tolist()

    def moved_view_point(route):
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "view_point_mm": point})

    page.route(f"**/v1/jobs/{job_id}/viewer", moved_view_point)
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    page.evaluate(f"() => {{ location.hash = 'job={job_id}'; }}")
    page.wait_for_selector(f"#result[data-viewer-ready='{job_id}']", timeout=30_000)
    for plane in PLANES:
        to_pixel = np.array(geometry["planes"][plane]["physical_to_pixel"])
        expected = round((to_pixel @ [*point, 1.0])[2])
        assert int(page.input_value(f"#slice-{plane}")) == expected, plane
    assert {int(page.input_value(f"#slice-{p}")) for p in PLANES} == {3, 17, 5}
    assert page.errors == []


# ------------------------------------------------------------- the viewer API


def test_viewer_geometry_and_slices_match_the_images(site, done_job, jobs_dir):
    import SimpleITK as sitk

    job_id = done_job["id"]
    viewer = _api(site, f"/v1/jobs/{job_id}/viewer")
    assert viewer.status_code == 200, viewer.text
    viewer = viewer.json()
    fixed = sitk.ReadImage(str(jobs_dir / job_id / "inputs" / "fixed.nii.gz"), sitk.sitkFloat32)
    registered = sitk.ReadImage(str(jobs_dir / job_id / "outputs" / "registered.nii.gz"))
    moving = sitk.ReadImage(str(jobs_dir / job_id / "inputs" / "moving.nii.gz"), sitk.sitkFloat32)
    assert viewer["size"] == list(fixed.GetSize())
    np.testing.assert_allclose(viewer["matrix_fixed_to_moving"],
                               done_job["result"]["matrix_fixed_to_moving"])
    axial = viewer["planes"]["axial"]
    point = np.array(axial["pixel_to_physical"]) @ [3, 5, 7, 1.0]
    np.testing.assert_allclose(point[:3], fixed.TransformContinuousIndexToPhysicalPoint(
        (3.0, 5.0, 7.0)))
    assert viewer["planes"]["axial"]["letters"] == {"left": "R", "right": "L", "top": "A",
                                                   "bottom": "P"}
    assert viewer["heatmaps"]["mind"] is None
    assert viewer["mapping"] == "linear"
    # the first slices pass where qa.png's planes do: result.json's view point
    result = json.loads((jobs_dir / job_id / "outputs" / "result.json").read_text())
    assert viewer["view_point"] == result["view_point"] == "overlap"
    np.testing.assert_allclose(viewer["view_point_mm"], result["view_point_mm"])
    p = [5.0, -7.0, 3.0]
    point = _api(site, f"/v1/jobs/{job_id}/point", x=p[0], y=p[1], z=p[2]).json()
    matrix = np.array(done_job["result"]["matrix_fixed_to_moving"])
    np.testing.assert_allclose(point["moving_point_mm"], (matrix @ [*p, 1.0])[:3])
    np.testing.assert_allclose(point["index"], fixed.TransformPhysicalPointToContinuousIndex(p))

    from disa.service.viewer import to_uint8

    before = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear,
                           float(sitk.GetArrayViewFromImage(moving).min()), sitk.sitkFloat32)
    arrays = {"fixed": sitk.GetArrayFromImage(fixed),
              "registered": sitk.GetArrayFromImage(registered),
              "before": sitk.GetArrayFromImage(before)}
    # identity directions: axial rows run along +y, coronal and sagittal rows along -z
    layers = {"axial": lambda a, i: a[i], "coronal": lambda a, i: a[::-1, i, :],
              "sagittal": lambda a, i: a[::-1, :, i]}
    for volume, array in arrays.items():
        window = viewer["windows"]["fixed" if volume == "fixed" else "moving"]
        for plane in PLANES:
            raw = _api(site, f"/v1/jobs/{job_id}/slices/{volume}/{plane}/9", format="raw")
            assert raw.status_code == 200, raw.text
            assert raw.headers["content-type"] == "application/octet-stream"
            expected = to_uint8(layers[plane](array, 9), tuple(window))
            got = np.frombuffer(raw.content, np.uint8).reshape(expected.shape)
            assert np.abs(got.astype(int) - expected).max() <= 1, (volume, plane)
    png = _api(site, f"/v1/jobs/{job_id}/slices/fixed/coronal/12")
    assert png.headers["content-type"] == "image/png"
    assert _png_array(png.content).shape == (24, 24, 3)
    custom = _api(site, f"/v1/jobs/{job_id}/slices/fixed/axial/12", format="raw",
                  window=0.5, level=0.25)
    expected = to_uint8(arrays["fixed"][12], (0.0, 0.5))
    assert np.abs(np.frombuffer(custom.content, np.uint8).reshape(24, 24).astype(int)
                  - expected).max() <= 1


def test_viewer_routes_refuse_what_they_should(site, done_job, pair_files, tmp_path):
    job_id = done_job["id"]
    url = f"/v1/jobs/{job_id}"
    assert _api(site, f"{url}/slices/fixed/axial/24").status_code == 422
    assert _api(site, f"{url}/slices/moving/axial/1").status_code == 422
    assert _api(site, f"{url}/slices/fixed/oblique/1").status_code == 422
    assert _api(site, f"{url}/slices/fixed/axial/1", window=10).status_code == 422
    assert _api(site, "/v1/jobs/../viewer").status_code in (404, 422)
    assert _api(site, "/v1/jobs/NOT-AN-ID/viewer").status_code == 422
    assert _api(site, f"/v1/jobs/{'0' * 32}/viewer").status_code == 404
    assert _api(site, f"/v1/jobs/{'0' * 32}/heatmap", x=0, y=0, z=0).status_code == 404
    assert _api(site, f"{url}/heatmap", x=0, y=0, z=9000).status_code == 422  # outside
    assert _api(site, f"{url}/heatmap", x=0, y=0, z="nan").status_code == 422
    assert httpx.get(f"{site}{url}/viewer").status_code == 401
    assert httpx.get(f"{site}{url}/slices/fixed/axial/1",
                     headers={"X-API-Key": "wrong"}).status_code == 403
    # a job that did not succeed: 409 with a reason
    truncated = tmp_path / "moving.nii.gz"
    truncated.write_bytes(pair_files[1].read_bytes()[:3000])
    with DisaClient(site, api_key=API_KEY) as client:
        failed = client.wait(client.submit(pair_files[0], truncated, TINY_OPTIONS)["id"],
                             poll_s=0.2, timeout_s=60)
    assert failed["state"] == "failed"
    for path, params in (("/viewer", {}), ("/slices/fixed/axial/1", {}),
                         ("/heatmap", {"x": 0, "y": 0, "z": 0})):
        refused = _api(site, f"/v1/jobs/{failed['id']}{path}", **params)
        assert refused.status_code == 409 and "failed" in refused.json()["detail"]
    # every error response is in the OpenAPI schema
    paths = httpx.get(f"{site}/openapi.json").json()["paths"]
    for path in ("/v1/jobs/{job_id}/viewer", "/v1/jobs/{job_id}/slices/{volume}/{plane}/{index}",
                 "/v1/jobs/{job_id}/heatmap", "/v1/jobs/{job_id}/point"):
        responses = paths[path]["get"]["responses"]
        assert {"200", "401", "403", "404", "409", "422"} <= set(responses), path
    assert "/" not in paths


def _trilinear_scipy(dmap, points: np.ndarray) -> np.ndarray:
    """Descriptors at LPS points by scipy's map_coordinates (order 1), channel by channel."""
    from scipy import ndimage

    idx = dmap.grid.to_index(points)  # (x, y, z)
    coords = idx[:, ::-1].T  # array order (z, y, x)
    data = dmap.as_float()
    return np.stack([ndimage.map_coordinates(data[..., c], coords, order=1, mode="nearest")
                     for c in range(data.shape[3])], axis=1)


def test_heatmap_values_are_descriptor_similarities(site, done_job, jobs_dir):
    import SimpleITK as sitk

    from disa.model.card import default_card_path
    from disa.registration.options import RegistrationOptions
    from disa.registration.pipeline import auto_working_spacing, descriptor_maps, prepare

    job_id = done_job["id"]
    folder = jobs_dir / job_id
    fixed = sitk.ReadImage(str(folder / "inputs" / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(folder / "inputs" / "moving.nii.gz"))
    options = RegistrationOptions.model_validate(done_job["options"])
    spacing = auto_working_spacing(fixed, moving, "mind")
    fixed_map, _, _ = descriptor_maps(prepare(fixed, spacing, None), "mind", options)
    moving_map, _, _ = descriptor_maps(prepare(moving, spacing, None), "mind", options)
    matrix = np.array(done_job["result"]["matrix_fixed_to_moving"])
    viewer = _api(site, f"/v1/jobs/{job_id}/viewer").json()

    p = np.array([-6.0, 5.0, 2.0])
    f = _trilinear_scipy(fixed_map, p[None, :])[0]
    for plane in ("axial", "sagittal"):
        started = time.perf_counter()
        answer = _api(site, f"/v1/jobs/{job_id}/heatmap", x=p[0], y=p[1], z=p[2], plane=plane,
                      similarity="mind")
        assert answer.status_code == 200, answer.text
        heat = answer.json()
        assert heat["kind"] == "neg_ssd" and heat["plane"] == plane
        np.testing.assert_allclose(heat["moving_point_mm"], (matrix @ np.append(p, 1))[:3])
        geometry = viewer["planes"][plane]
        values = np.array([np.nan if v is None else v for v in heat["values"]]
                          ).reshape(heat["height"], heat["width"])
        checked = 0
        for row, column in ((12, 12), (5, 17), (18, 6), (10, 3)):
            q = (np.array(geometry["pixel_to_physical"]) @ [column, row, heat["slice"], 1])[:3]
            moved = (matrix @ np.append(q, 1))[:3]
            inside = np.all((idx := moving_map.grid.to_index(moved[None, :])[0]) >= 0) and \
                np.all(idx <= np.array(moving_map.grid.size_xyz) - 1)
            if not inside:
                assert np.isnan(values[row, column])
                continue
            m = _trilinear_scipy(moving_map, moved[None, :])[0]
            expected = -np.sum((m.astype(np.float64) - f) ** 2)
            assert values[row, column] == pytest.approx(expected, rel=1e-4, abs=1e-5)
            checked += 1
        assert checked >= 3
        assert heat["peak"]["value"] == pytest.approx(np.nanmax(values))
        assert time.perf_counter() - started < 30
    # descriptors are cached in the job folder, outside the official result files
    assert any((folder / "viewer-cache").glob("mind-*/moving.npy"))
    job = _api(site, f"/v1/jobs/{job_id}").json()
    assert not any("cache" in name for name in job["files"])
    assert _api(site, f"/v1/jobs/{job_id}/files/viewer-cache").status_code == 404
    png = _api(site, f"/v1/jobs/{job_id}/heatmap", x=p[0], y=p[1], z=p[2], format="png")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    disa = _api(site, f"/v1/jobs/{job_id}/heatmap", x=p[0], y=p[1], z=p[2], similarity="disa")
    if default_card_path() is None:
        assert disa.status_code == 409 and "DISA model" in disa.json()["detail"]
    else:
        assert disa.status_code == 200 and disa.json()["kind"] == "dot"
        _check_disa_values(disa.json(), fixed, moving, options, matrix, viewer, p)


def _check_disa_values(heat, fixed, moving, options, matrix, viewer, p) -> None:
    """DISA heatmap values are dot products of the fixed descriptor at p and the moving
    descriptors at T(q), both interpolated trilinearly (computed here independently)."""
    from disa.registration.pipeline import auto_working_spacing, descriptor_maps, prepare

    spacing = auto_working_spacing(fixed, moving, "disa")
    fixed_map, _, _ = descriptor_maps(prepare(fixed, spacing, None), "disa", options)
    moving_map, _, _ = descriptor_maps(prepare(moving, spacing, None), "disa", options)
    f = _trilinear_scipy(fixed_map, p[None, :])[0]
    geometry = viewer["planes"][heat["plane"]]
    values = np.array([np.nan if v is None else v for v in heat["values"]]
                      ).reshape(heat["height"], heat["width"])
    checked = 0
    for row, column in ((12, 12), (5, 17), (18, 6), (10, 3)):
        q = (np.array(geometry["pixel_to_physical"]) @ [column, row, heat["slice"], 1])[:3]
        moved = (matrix @ np.append(q, 1))[:3]
        idx = moving_map.grid.to_index(moved[None, :])[0]
        if np.any(idx < 0) or np.any(idx > np.array(moving_map.grid.size_xyz) - 1):
            continue
        m = _trilinear_scipy(moving_map, moved[None, :])[0]
        assert values[row, column] == pytest.approx(float(np.dot(m, f)), rel=1e-3, abs=1e-4)
        checked += 1
    assert checked >= 1


def test_planes_follow_flipped_and_permuted_grids():
    """Display planes of grids stored in other orientations: pixels, indices and LPS agree."""
    from disa.core.grid import Grid
    from disa.service.viewer import plane_geometry

    rng = np.random.default_rng(0)
    array = rng.random((5, 6, 7)).astype(np.float32)  # (z, y, x): size (7, 6, 5)
    directions = {
        "RAS-stored": np.diag([-1.0, -1.0, 1.0]),
        "permuted": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        "oblique": _rotation_x(np.deg2rad(20)) @ np.diag([1.0, -1.0, 1.0]),
    }
    for label, direction in directions.items():
        grid = Grid(shape=(5, 6, 7), origin=np.array([10.0, -20.0, 5.0]),
                    spacing=np.array([1.0, 2.0, 3.0]), direction=direction)
        for name, axes in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
            plane = plane_geometry(grid, name)
            layer = plane.take(array, 2)
            assert layer.shape == (plane.height, plane.width), (label, name)
            for row, column in ((0, 0), (plane.height - 1, 1), (1, plane.width - 1)):
                i, j, k, _ = plane.pixel_to_index @ [column, row, 2, 1.0]
                assert layer[row, column] == array[int(k), int(j), int(i)], (label, name)
                np.testing.assert_allclose(
                    plane.pixel_to_physical @ [column, row, 2, 1.0],
                    np.append(grid.to_physical(np.array([[i, j, k]]))[0], 1.0))
            # columns run towards the patient's left (or posterior for sagittal) on screen
            col_dir = plane.pixel_to_physical[:3, 0]
            wanted = {"axial": 0, "coronal": 0, "sagittal": 1}[name]
            assert abs(col_dir[wanted]) == np.abs(col_dir).max() and col_dir[wanted] > 0
            assert int(np.argmax(np.abs(direction[:, plane.normal_axis]))) == axes, (label, name)


def test_view_point_falls_back_to_the_fixed_grid_centre():
    """Results written before result.json had view_point_mm, or with a broken one."""
    from disa.core.grid import Grid
    from disa.service.viewer import view_point

    grid = Grid(shape=(6, 7, 8), origin=np.array([-10.0, 0.0, 5.0]),
                spacing=np.array([2.0, 2.0, 3.0]), direction=np.eye(3))
    point, source = view_point({"view_point_mm": [1.0, 2.0, 30.0], "view_point": "overlap"},
                               grid)
    assert source == "overlap"
    np.testing.assert_allclose(point, [1.0, 2.0, 30.0])
    for result in (None, {}, {"view_point_mm": [1.0, 2.0]}, {"view_point_mm": "x"},
                   {"view_point_mm": [1.0, float("nan"), 2.0], "view_point": "overlap"},
                   {"view_point_mm": [1.0, 2.0, 3.0], "view_point": "elsewhere"}):
        point, source = view_point(result, grid)
        assert source == "fixed centre", result
        np.testing.assert_allclose(point, [-3.0, 6.0, 12.5])


def _rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def test_non_linear_jobs_map_points_through_their_displacement_field():
    """T p = p + u(p) when the job has displacement.nii.gz; the matrix otherwise."""
    from disa.core.grid import Grid
    from disa.service.heatmap import fixed_to_moving
    from disa.service.viewer import JobVolumes

    grid = Grid(shape=(6, 7, 8), origin=np.array([-10.0, 0.0, 5.0]),
                spacing=np.array([2.0, 2.0, 3.0]), direction=np.eye(3))
    k, _, i = np.meshgrid(np.arange(6), np.arange(7), np.arange(8), indexing="ij")
    field = np.stack([0.5 * i, np.full(i.shape, -2.0), 0.25 * k], axis=-1).astype(np.float32)
    matrix = np.eye(4)
    matrix[:3, 3] = [100.0, 0.0, 0.0]  # ignored when there is a field
    volumes = JobVolumes(grid=grid, arrays={}, windows={}, displacement=field)
    p = grid.to_physical(np.array([[2.5, 3.0, 1.5], [0.0, 0.0, 0.0]]))
    expected = p + np.array([[1.25, -2.0, 0.375], [0.0, -2.0, 0.0]])
    np.testing.assert_allclose(fixed_to_moving(volumes, matrix)(p), expected, atol=1e-5)
    outside = fixed_to_moving(volumes, matrix)(np.array([[-50.0, 0.0, 5.0]]))
    assert np.isnan(outside).all()
    linear = JobVolumes(grid=grid, arrays={}, windows={})
    np.testing.assert_allclose(fixed_to_moving(linear, matrix)(p), p + np.array([100.0, 0, 0]))
