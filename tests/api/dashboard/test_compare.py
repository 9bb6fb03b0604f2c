"""The compare and datasets pages in Chromium against a live stack (tests/api/dashboard/
conftest.py): two jobs of two different sweeps, trained by the real worker, picked with the
jobs page's checkboxes and compared: the config difference, any metric overlaid as the API
aligns it (then on a log scale and smoothed), the view carried by the URL across a reload;
and an uploaded dataset on the datasets page. Screenshots: compare.png, datasets.png."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.api.dashboard.test_dashboard import config

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(300)]

FINAL = {"succeeded", "failed", "cancelled"}


def shown(page, job_id: str) -> list[tuple]:
    return [tuple(p) for p in page.evaluate("window.unrollCharts()").get("compare", {}).get("series", {}).get(job_id, [])]


def expected(comparison: dict, metric: str, job_id: str) -> list[tuple]:
    """The points the page should draw for one job: the API's aligned table, without the
    steps where the job has no point (its non-finite steps stay, as null)."""
    table = comparison["series"][metric]
    nonfinite = set(table["nonfinite"].get(job_id, []))
    return [(s, v) for s, v in zip(table["steps"], table["values"][job_id]) if v is not None or s in nonfinite]


def close(got: list, want: list) -> bool:
    return len(got) == len(want) and all(
        gs == ws and (gv is None and wv is None or gv == pytest.approx(wv, rel=1e-9)) for (gs, gv), (ws, wv) in zip(got, want)
    )


def ema(points: list[tuple], weight: float) -> list[tuple]:
    out, last, n = [], 0.0, 0
    for step, value in points:
        if value is None:
            out.append((step, None))
            continue
        last = last * weight + (1 - weight) * value
        n += 1
        out.append((step, last / (1 - weight**n)))
    return out


def test_two_jobs_of_different_sweeps_side_by_side(page, dashboard, screenshot):
    base = config(60, name="cmp", train={"eval_every": 20, "checkpoint_every": 0})
    sweeps = [dashboard.sweep({"name": f"cmp-k{k}", "base": base, "grid": {"tbptt.k1": [k]}}) for k in (2, 16)]
    a, b = (s["jobs"][0]["job_id"] for s in sweeps)
    for job_id in (a, b):
        dashboard.wait(job_id, FINAL, timeout=180)

    # Picked on the jobs page: a checkbox per job, then "Compare selected".
    page.goto("/")
    compare = page.locator("#compare-selected")
    expect(compare).to_be_disabled()
    page.locator(f"input[data-select='{a}']").check()
    page.locator(f"input[data-select='{b}']").check()
    expect(compare).to_have_text("Compare selected (2)")
    page.wait_for_timeout(2500)  # a poll of the list redraws the rows: the ticks stay
    expect(page.locator(f"input[data-select='{a}']")).to_be_checked()
    compare.click()
    expect(page.get_by_role("heading", name="Compare 2 jobs")).to_be_visible()
    assert f"jobs={a},{b}" in page.url

    api = dashboard.api.get("/v1/compare", params={"jobs": f"{a},{b}", "max_points": 1000}).json()
    # The default metric is the task's (recall: valid/accuracy), drawn as the API aligns it.
    expect(page.locator("#compare-metric")).to_have_value("valid/accuracy")
    page.wait_for_function(f"() => (window.unrollCharts().compare?.series['{a}'] || []).length > 0", timeout=20_000)
    for job_id in (a, b):
        assert shown(page, job_id) == expected(api, "valid/accuracy", job_id) and shown(page, job_id)
    # Only what differs: k1 (and k2, which follows it), and the sweep's job names.
    rows = page.locator("#compare-config tbody tr")
    keys = rows.evaluate_all("rows => rows.map(r => r.dataset.key)")
    assert keys == [row["key"] for row in api["config_diff"]] and "tbptt.k1" in keys and "model.cell" not in keys
    expect(page.locator("#compare-config tr[data-key='tbptt.k1'] td")).to_have_text(["2", "16"])
    expect(page.locator(f"#compare-jobs tr[data-job='{b}']")).to_contain_text(sweeps[1]["id"])

    # Any metric they have; then a log scale and smoothing. The URL carries all of it.
    page.locator("#compare-metric").select_option("train/loss")
    loss = dashboard.api.get("/v1/compare", params={"jobs": f"{a},{b}", "metrics": "train/loss", "max_points": 1000}).json()
    page.wait_for_function(f"() => (window.unrollCharts().compare?.series['{a}'] || []).length === {len(expected(loss, 'train/loss', a))}")
    assert shown(page, a) == expected(loss, "train/loss", a) and shown(page, b) == expected(loss, "train/loss", b)
    page.get_by_label("Log scale").check()
    page.locator("#compare-smooth").fill("0.6")
    page.wait_for_function("() => window.unrollCharts().compare.yLog === true")
    for job_id in (a, b):
        assert close(shown(page, job_id), ema(expected(loss, "train/loss", job_id), 0.6))
    assert "metric=train%2Floss" in page.url and "log=1" in page.url and "smooth=0.6" in page.url
    screenshot(page, "compare")

    page.reload()  # a shared link opens the same view
    expect(page.locator("#compare-metric")).to_have_value("train/loss")
    expect(page.get_by_label("Log scale")).to_be_checked()
    page.wait_for_function(f"() => (window.unrollCharts().compare?.series['{b}'] || []).length > 0", timeout=20_000)
    assert close(shown(page, b), ema(expected(loss, "train/loss", b), 0.6))

    # An unknown job says so.
    page.goto(f"/compare?jobs={a},job_doesnotexist")
    expect(page.get_by_role("alert")).to_contain_text("does not exist")


def test_datasets_page_lists_an_upload(page, dashboard, screenshot):
    body = b"the cat sat on the mat\n" * 100
    r = dashboard.api.post("/v1/datasets", params={"name": "pets.txt"}, content=body,
                           headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    dataset = r.json()
    page.goto("/")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Datasets").click()
    expect(page.get_by_role("heading", name="Datasets")).to_be_visible()
    row = page.locator(f"tr[data-dataset='{dataset['id']}']")
    expect(row).to_contain_text("pets.txt")
    expect(row.locator("[data-bytes]")).to_have_attribute("data-bytes", str(len(body)))
    expect(row).to_contain_text(dataset["sha256"][:12])
    screenshot(page, "datasets")
    page.reload()  # /datasets is a deep link too
    expect(page.locator(f"tr[data-dataset='{dataset['id']}']")).to_contain_text("pets.txt")
