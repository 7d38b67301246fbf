# ruff: noqa: F811
"""The result view in Chromium (issue 25): the verdict first, its own address, one overall
progress bar, the fusion viewer, the transform in words, an 800 px wide layout.

Uses test_web.py's live service (embedded worker, API key) and browser fixtures.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

from .helpers import API_KEY, click_pixel, enter_key, open_tab

# test_web.py's fixtures, used here by name (F401, F811: pytest passes them as arguments)
from .test_web import (  # noqa: F401
    _png_array,
    _wait_rendered,
    browser,
    done_job,
    jobs_dir,
    page,
    site,
)

pytestmark = pytest.mark.timeout(180)

PLANES = ("axial", "coronal", "sagittal")
WORDS = {"likely": "Likely correct", "uncertain": "Check before use", "failed": "Failed"}


def _shot(tab, name: str) -> None:
    """Save a screenshot when DISA_TEST_SHOTS names a folder (for looking at the page)."""
    folder = os.environ.get("DISA_TEST_SHOTS")
    if folder:
        tab.screenshot(path=f"{folder}/{name}.png", full_page=True)


def _with_key(tab) -> None:
    enter_key(tab, API_KEY)


def _overflow(tab) -> int:
    """Pixels the page is wider than the window (0: no horizontal scroll bar)."""
    return tab.evaluate("() => document.documentElement.scrollWidth"
                        " - document.documentElement.clientWidth")


@pytest.fixture
def narrow(browser, site: str) -> Iterator:
    """A tab 800 px wide."""
    context, tab = open_tab(browser, site, width=800)
    yield tab
    context.close()


def test_the_result_view_has_its_own_address_at_the_top_and_the_list_shows_the_verdict(
        page, site, done_job):
    job_id, result = done_job["id"], done_job["result"]
    _with_key(page)
    page.goto(f"{site}/jobs/{job_id}")  # a link to the result (the key stays in the tab)
    page.wait_for_selector("#result[data-state=succeeded]", timeout=30_000)
    page.wait_for_selector(f"#result[data-viewer-ready='{job_id}']", timeout=30_000)
    _shot(page, "result-1280")
    assert page.is_hidden("#upload-section") and page.is_hidden("#jobs-section")
    assert page.locator("#result").bounding_box()["y"] < 200  # at the top, not far below
    verdict = page.locator("#verdict")
    assert verdict.get_attribute("data-verdict") == result["verdict"]
    assert WORDS[result["verdict"]] in verdict.text_content()
    assert f"Evidence: {result['verdict_evidence']}." in verdict.text_content()
    assert page.locator("#verdict").bounding_box()["y"] < page.locator(
        "#result-summary").bounding_box()["y"]
    # the transform in human terms: degrees, the convention, the centre, the direction
    words = page.text_content("#transform-summary")
    described = result["transform_description"]
    angles = ", ".join(f"{v:.2f}°" for v in described["rotation_deg"])
    assert angles in words
    assert "Rz Ry Rx" in words and "fixed → moving" in words
    assert "(" + ", ".join(f"{v:.1f}" for v in described["centre_mm"]) + ") mm LPS" in words
    assert ", ".join(f"{v:.2f} mm" for v in described["translation_mm"]) in words
    assert page.is_hidden("#raw-parameters")  # the raw names only on request
    page.click(".raw-parameters summary")
    assert "angle_x_rad" in page.text_content("#raw-parameters")
    # back to the list: the job's verdict in words and colour, with the same evidence
    page.click("#result-back")
    assert page.evaluate("() => location.pathname") == "/"
    row = page.locator(f"#jobs-body tr[data-id='{job_id}']")
    row.wait_for(timeout=10_000)
    badge = row.locator(".badge")
    assert badge.text_content() == WORDS[result["verdict"]]
    assert badge.get_attribute("data-verdict") == result["verdict"]
    assert result["verdict_evidence"] in row.text_content()
    colour = badge.evaluate("b => getComputedStyle(b).backgroundColor")
    assert colour != "rgb(107, 114, 128)"  # a verdict's colour, not the grey of none
    assert row.locator("progress").evaluate("bar => bar.value") == 1
    # the browser's Back button returns to the result view
    page.go_back()
    page.wait_for_selector(f"#result[data-job='{job_id}']:not([hidden])", timeout=10_000)
    assert page.errors == []


def test_an_800_px_window_has_no_horizontal_overflow(narrow, site, done_job):
    tab = narrow
    _with_key(tab)
    row = tab.locator(f"#jobs-body tr[data-id='{done_job['id']}']")
    row.wait_for(timeout=10_000)
    _shot(tab, "home-800")
    assert _overflow(tab) <= 0
    assert row.locator(".badge").is_visible()  # the verdict is in the list at this width
    tab.click(f"#jobs-body tr[data-id='{done_job['id']}'] .job-link")
    tab.wait_for_selector(f"#result[data-viewer-ready='{done_job['id']}']", timeout=30_000)
    tab.locator("#verdict").wait_for()
    _shot(tab, "result-800")
    assert _overflow(tab) <= 0
    for canvas in tab.locator("#planes canvas").all():
        box = canvas.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 800
    assert tab.errors == []


def test_progress_is_one_overall_bar_in_plain_words_with_a_time_estimate(page, site):
    job_id = "d" * 32
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 6))
    updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time()))
    job = {"id": job_id, "owner": "x", "state": "running", "created_at": started,
           "updated_at": updated, "started_at": started, "finished_at": None,
           "progress": {"stage": "search", "fraction": 0.5}, "attempts": 1,
           "cancel_requested": False, "options": {}, "inputs": {},
           "timings": {"queued_s": 0.1, "run_s": None, "stages": {}}, "result": None,
           "error": None, "error_kind": None, "files": []}
    current = {"job": job}
    page.route(f"**/v1/jobs/{job_id}", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(current["job"])))
    _with_key(page)
    page.goto(f"{site}/jobs/{job_id}")
    page.locator("#result-stage", has_text="Searching for the best alignment").wait_for(
        timeout=10_000)
    first = page.locator("#result-bar").evaluate("bar => bar.value")
    assert 0.1 < first < 0.6
    # 6 s (the service's clock) for the share done so far: the rest at that pace
    page.locator("#result-eta", has_text=" s left").wait_for(timeout=5_000)
    left = float(page.text_content("#result-eta").split()[1])
    assert left == pytest.approx(6 * (1 - first) / first, abs=1.5)
    # the next stage starts at 0 %: the overall bar still moves forward
    current["job"] = {**job, "progress": {"stage": "refine", "fraction": 0.0}}
    page.locator("#result-stage", has_text="Checking the best candidates").wait_for(
        timeout=10_000)
    assert page.locator("#result-bar").evaluate("bar => bar.value") >= first
    assert "search" not in page.text_content("#result-progress")  # no internal names
    assert page.errors == []


def _wait_value(tab, selector: str, different_from: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = tab.input_value(selector)
        if value != different_from:
            return value
        time.sleep(0.05)
    pytest.fail(f"{selector} stayed {different_from}")


def test_the_viewer_links_planes_scrolls_zooms_pans_and_windows(page, site, done_job):
    job_id = done_job["id"]
    geometry = json.loads(page.request.get(f"{site}/v1/jobs/{job_id}/viewer",
                                           headers={"X-API-Key": API_KEY}).text())
    _with_key(page)
    page.goto(f"{site}/jobs/{job_id}")
    page.wait_for_selector(f"#result[data-viewer-ready='{job_id}']", timeout=30_000)
    axial = "figure[data-plane=axial] canvas.fixed-view"
    assert page.locator(axial).evaluate("c => c.width") > 240  # larger than the old 240 px
    # fusion first; the edges view is one click away
    assert page.is_checked("#display-form input[name=overlay][value=fusion]")
    assert page.locator("#display-form input[name=overlay][value=edges]").is_visible()

    # a click in the coronal plane moves the crosshair there in all three planes
    coronal = geometry["planes"]["coronal"]
    column, row = 6, 15
    click_pixel(page, "figure[data-plane=coronal] canvas.moving-view", coronal, column, row)
    p = np.array(json.loads(page.get_attribute("#point-info", "data-fixed")))
    expected = np.array(coronal["pixel_to_physical"]) @ [column, row,
                                                         int(page.input_value("#slice-coronal")),
                                                         1.0]
    np.testing.assert_allclose(p, expected[:3], atol=1e-6)
    for name in ("axial", "sagittal"):
        to_pixel = np.array(geometry["planes"][name]["physical_to_pixel"])
        c, r, s = (to_pixel @ [*p, 1.0])[:3]
        # (the other planes follow the click asynchronously: wait for them, then check)
        page.wait_for_function(f"() => document.querySelector('#slice-{name}').value"
                               f" == '{round(s)}'", timeout=10_000)
        assert int(page.input_value(f"#slice-{name}")) == round(s), name
        selector = f"figure[data-plane={name}] canvas.fixed-view"
        page.wait_for_function(f"() => document.querySelector('{selector}').dataset.crosshair")
        np.testing.assert_allclose(json.loads(page.get_attribute(selector, "data-crosshair")),
                                   [c, r], atol=1e-6)

    # the mouse wheel over an image changes its slice, not the page's scroll position
    page.locator(axial).scroll_into_view_if_needed()
    scrolled = page.evaluate("() => window.scrollY")
    index = page.input_value("#slice-axial")
    page.locator(axial).hover()
    page.mouse.wheel(0, 120)
    assert int(_wait_value(page, "#slice-axial", index)) == int(index) + 1
    assert page.evaluate("() => window.scrollY") == scrolled

    # the scale bar says how many mm its length is
    plane = geometry["planes"]["axial"]
    width = page.locator(axial).evaluate("c => c.width")
    mm_per_px = plane["width"] * plane["pixel_spacing_mm"][0] / width
    scale_mm = float(page.get_attribute(axial, "data-scale-mm"))
    assert float(page.get_attribute(axial, "data-scale-px")) == pytest.approx(
        scale_mm / mm_per_px, rel=1e-3)

    # zoom (button and Ctrl + wheel) magnifies: the same bar length covers fewer mm
    count = int(page.get_attribute(axial, "data-rendered"))
    page.click("#zoom-in")
    count = _wait_rendered(page, axial, count)
    assert page.get_attribute("#planes", "data-zoom") == "1.5"
    zoomed_px = float(page.get_attribute(axial, "data-scale-px"))
    zoomed_mm = float(page.get_attribute(axial, "data-scale-mm"))
    assert zoomed_px / zoomed_mm == pytest.approx(1.5 / mm_per_px, rel=1e-3)
    page.locator(axial).hover()
    page.keyboard.down("Control")
    page.mouse.wheel(0, -120)
    page.keyboard.up("Control")
    page.wait_for_function("() => Number(document.getElementById('planes').dataset.zoom) > 1.5")
    # a drag pans the view without moving the marked point
    count = int(page.get_attribute(axial, "data-rendered"))
    before = _png_array(page.locator(axial).screenshot())
    marked = page.get_attribute("#point-info", "data-fixed")
    box = page.locator(axial).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 60, box["y"] + box["height"] / 2 + 30,
                    steps=6)
    page.mouse.up()
    _wait_rendered(page, axial, count)
    assert np.abs(_png_array(page.locator(axial).screenshot()) - before).mean() > 1.0
    assert page.get_attribute("#point-info", "data-fixed") == marked
    _shot(page, "viewer-zoomed")
    page.click("#zoom-reset")

    # window and level per image: a preset asks the service for that window
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/slices/fixed/" in r.url else None)
    page.select_option("#wl-fixed-preset", "ct-bone")
    page.wait_for_function("() => document.getElementById('wl-fixed-window').value === '1800'")
    deadline = time.monotonic() + 10
    while not any("window=1800" in url and "level=400" in url for url in asked):
        assert time.monotonic() < deadline, asked
        page.wait_for_timeout(50)
    assert not any("/slices/registered/" in url for url in asked)  # the moving image kept its own
    page.fill("#wl-moving-window", "500")
    page.fill("#wl-moving-level", "250")
    page.press("#wl-moving-level", "Enter")
    page.wait_for_function("() => document.getElementById('wl-moving-preset').value === 'custom'")
    assert page.errors == []


def test_a_deformable_result_shows_its_jacobian_figures_and_a_displacement_overlay(
        page, site, done_job, pair_files):
    from disa.service.client import DisaClient

    from .helpers import TINY_OPTIONS

    with DisaClient(site, api_key=API_KEY) as client:
        job = client.wait(client.submit(*pair_files, {**TINY_OPTIONS, "mode": "deformable"})["id"],
                          poll_s=0.2, timeout_s=120)
    assert job["state"] == "succeeded", job["error"]
    deformation = job["result"]["deformation"]  # in the job JSON, as in result.json
    _with_key(page)
    page.goto(f"{site}/jobs/{job['id']}")
    page.wait_for_selector(f"#result[data-viewer-ready='{job['id']}']", timeout=30_000)
    words = page.text_content("#transform-summary")
    assert f"{100 * deformation['negative_jacobian_fraction']:.3f}% of voxels" in words
    assert f"SD of log det J{deformation['sd_log_jacobian']:.3f}" in words
    assert "Scale (x, y, z)" in words and "Shear (xy, xz, yz)" in words  # the affine stage
    # the displacement overlay: |u| in colour on the fixed image, its scale named
    option = page.locator("#display-form input[name=overlay][value=deformation]")
    assert option.is_visible()
    moving = "figure[data-plane=axial] canvas.moving-view"
    count = int(page.get_attribute(moving, "data-rendered"))
    fusion = _png_array(page.locator(moving).screenshot())
    with page.expect_response(lambda r: "/slices/displacement/axial/" in r.url
                              and r.status == 200):
        option.check()
    _wait_rendered(page, moving, count)
    assert np.abs(_png_array(page.locator(moving).screenshot()) - fusion).mean() > 1.0
    assert "displacement |u|" in page.text_content("figure[data-plane=axial] .moving-label")
    # a rigid job has no such overlay, and the API says why
    page.goto(f"{site}/jobs/{done_job['id']}")
    page.wait_for_selector(f"#result[data-viewer-ready='{done_job['id']}']", timeout=30_000)
    assert not option.is_visible()
    assert page.is_checked("#display-form input[name=overlay][value=fusion]")
    refused = page.request.get(f"{site}/v1/jobs/{done_job['id']}/slices/displacement/axial/1",
                               headers={"X-API-Key": API_KEY})
    assert refused.status == 422 and "no displacement field" in refused.text()
    assert page.errors == []


def test_the_heatmap_reports_the_points_percentile_and_nearest_peak(page, site, done_job):
    job_id = done_job["id"]
    _with_key(page)
    page.goto(f"{site}/jobs/{job_id}")
    page.wait_for_selector(f"#result[data-viewer-ready='{job_id}']", timeout=30_000)
    assert "Pick a distinctive point" in page.text_content("#heatmap-section")
    p = (-6.0, 5.0, 2.0)
    for axis, value in zip("xyz", p, strict=True):
        page.fill(f"#point-{axis}", str(value))
    page.click("#point-form button[type=submit]")
    page.wait_for_selector("#heatmap-mind[data-state=ready]", timeout=30_000)
    heat = page.request.get(f"{site}/v1/jobs/{job_id}/heatmap?x={p[0]}&y={p[1]}&z={p[2]}"
                            "&plane=axial&similarity=mind", headers={"X-API-Key": API_KEY}).json()
    assert float(page.get_attribute("#heatmap-mind", "data-percentile")) == pytest.approx(
        heat["point_percentile"])
    status = page.text_content("#heatmap-mind-status")
    if heat["point_rank"] == 1:
        assert "the highest value on this slice" in status
    else:
        assert f"(rank {heat['point_rank']})" in status
    near = heat["nearest_peak"]
    assert ("on a local peak" in status if near["distance_mm"] < 0.05
            else f"nearest local peak {near['distance_mm']:.1f} mm away" in status), status
    # the colour bar: its ends are the map's range
    assert float(page.text_content("#heatmap-mind-low")) == pytest.approx(heat["min"], rel=0.01)
    assert float(page.text_content("#heatmap-mind-high")) == pytest.approx(heat["max"], rel=0.01)
    assert page.locator("#heatmap-section .colour-bar-ramp").first.bounding_box()["width"] > 50
    assert page.errors == []


def test_closing_the_viewer_while_it_resizes_raises_no_error(page, site, done_job):
    """A resize seen by the viewer redraws on the next frame; going back to the list in
    between left that frame drawing into figures that were gone (a TypeError on the page,
    seen once in CI)."""
    job_id = done_job["id"]
    _with_key(page)
    page.goto(f"{site}/jobs/{job_id}")
    page.wait_for_selector(f"#result[data-viewer-ready='{job_id}']", timeout=30_000)
    # Resize the planes, let the frame's resize observer run (it schedules the redraw for
    # the next frame), then go back before that frame.
    page.evaluate("""() => new Promise(resolve => {
        document.querySelector('#planes').style.width = '420px';
        requestAnimationFrame(() => setTimeout(() => {
            document.querySelector('#result-back').click();
            resolve();
        }, 0));
    })""")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.wait_for_timeout(100)
    assert page.errors == []


def test_the_bundled_sample_shows_as_likely_on_the_page(page, site):
    """The newcomer's first run: the bundled pair, default options."""
    from disa.sample import sample_paths

    fixed, moving, _ = sample_paths()
    _with_key(page)
    page.set_input_files("#fixed", str(fixed))
    page.set_input_files("#moving", str(moving))
    page.click("#submit")
    page.wait_for_selector("#result[data-state=succeeded]", timeout=150_000)
    verdict = page.locator("#verdict")
    verdict.wait_for()
    assert verdict.get_attribute("data-verdict") == "likely", verdict.text_content()
    assert "Likely correct" in verdict.text_content()
    page.click("#result-back")
    job_id = page.evaluate("() => document.querySelector('#jobs-body tr').dataset.id")
    badge = page.locator(f"#jobs-body tr[data-id='{job_id}'] .badge")
    assert badge.text_content() == "Likely correct"
    assert page.errors == []


def test_an_uncertain_verdict_says_why_in_amber_and_nothing_contradicts_it(page, site):
    job_id = "e" * 32
    stamp = "2026-01-01T00:00:00Z"
    result = {"verdict": "uncertain",
              "verdict_reason": "only 12% of the refined solutions agree: check qa.png",
              "verdict_evidence": "1 of 8 refined solutions agree, match quality 0.62 (0 chance, "
                                  "1 perfect), overlap 97%",
              "confidence": 0.125, "agreeing_solutions": 1, "refined_solutions": 8,
              "ambiguous": False, "match_quality": 0.62, "overlap": 0.97, "mode": "rigid",
              "similarity": "mind", "parameters": [0.0] * 6,
              "parameter_names": ["angle_x_rad", "angle_y_rad", "angle_z_rad", "t_x_mm", "t_y_mm",
                                  "t_z_mm"]}
    job = {"id": job_id, "owner": "x", "state": "succeeded", "created_at": stamp,
           "updated_at": stamp, "started_at": stamp, "finished_at": stamp,
           "progress": {"stage": "done", "fraction": 1.0}, "attempts": 1,
           "cancel_requested": False, "options": {}, "inputs": {},
           "timings": {"queued_s": 0.1, "run_s": 2.0, "stages": {}}, "result": result,
           "error": None, "error_kind": None, "files": []}
    page.route(f"**/v1/jobs/{job_id}", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(job)))
    page.route("**/v1/jobs?limit=*", lambda route: route.fulfill(
        status=200, content_type="application/json",
        body=json.dumps({"items": [job], "total": 1, "offset": 0, "limit": 50})))
    _with_key(page)
    page.goto(f"{site}/jobs/{job_id}")
    verdict = page.locator("#verdict[data-verdict=uncertain]")
    verdict.wait_for(timeout=10_000)
    text = verdict.text_content()
    assert "Check before use" in text and f"Why: {result['verdict_reason']}" in text
    assert f"Evidence: {result['verdict_evidence']}." in text
    border = verdict.evaluate("v => getComputedStyle(v).borderTopColor")
    assert border == "rgb(180, 83, 9)"  # amber
    assert "Confidence" not in page.text_content("#result")  # no figure of its own
    page.click("#result-back")
    badge = page.locator(f"#jobs-body tr[data-id='{job_id}'] .badge")
    assert badge.text_content() == "Check before use"
    assert badge.get_attribute("data-verdict") == "uncertain"
