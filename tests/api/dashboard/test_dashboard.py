"""The dashboard in Chromium against a live stack: sign-in and the empty state, a real job's
page with live charts that hold exactly the API's points, cancel from the page, the
back button and deep links, and a real sweep's comparison page. Screenshots of the job and
sweep pages land in test-output/screenshots/."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(240)]

# Matches the page (frontend/src/metrics.ts, frontend/src/pages/sweep.ts).
# The job page's resolution, set through its URL (?max_points=) so that a short run is
# downsampled too (the page's default is 500).
JOB_MAX_POINTS = 40
CURVE_POINTS = 200
JOB_SERIES = ["train/loss", "valid/loss", "valid/accuracy", "train/grad_norm", "train/grad_norm_clipped", "train/clipped", "train/tokens_per_s"]


def config(steps: int, **sections) -> dict:
    base = {
        "model": {"cell": "lstm", "hidden_size": 16},
        "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 4000, "batch_size": 4, "valid_length": 64},
        "tbptt": {"k1": 8},
        "clip": {"mode": "norm", "max_norm": 0.5},
        "optim": {"lr": 0.01},
        "train": {"max_steps": steps, "eval_every": 50, "checkpoint_every": 50, "seed": 1, "device": "cpu"},
        "resources": {"cpus": 1},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return base


def charts(page) -> dict:
    return page.evaluate("window.unrollCharts()")


def pairs(points) -> list[tuple]:
    return [tuple(p) for p in points]


def test_sign_in_asks_for_a_token_and_shows_how_to_submit_a_first_job(fresh_page, dashboard, screenshot):
    page = fresh_page
    page.goto("/")
    expect(page.get_by_role("heading", name="Sign in to unroll")).to_be_visible()
    screenshot(page, "sign-in")
    token = page.get_by_label("Project token")
    expect(token).to_be_focused()
    token.fill("unroll_not-a-real-token")
    token.press("Enter")  # the keyboard submits the form
    expect(page.get_by_role("alert")).to_contain_text("not accepted")
    token.fill(dashboard.token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="No jobs yet")).to_be_visible()
    expect(page.locator("[data-empty=jobs]")).to_contain_text("unroll submit job.yaml")
    screenshot(page, "jobs-empty")
    # Stored in the browser and sent as a header, never in a URL.
    assert page.evaluate("localStorage.getItem('unroll.token')") == dashboard.token
    assert dashboard.token not in page.url
    # A deep link opens straight onto its page once signed in; unknown ids say so.
    page.goto("/jobs/job_doesnotexist")
    expect(page.get_by_role("heading", name="Job not found")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in to unroll")).to_be_visible()


def test_job_page_charts_follow_the_run_and_hold_the_apis_points(page, dashboard, screenshot):
    job = dashboard.submit(config(150, name="dash-job", tags=["dash"]))
    page.goto(f"/jobs/{job['id']}?max_points={JOB_MAX_POINTS}")  # a deep link, opened before the job runs
    expect(page.get_by_role("heading", name="dash-job")).to_be_visible()
    # Live: points arrive while it runs (the stream says when; the page reads the tail).
    page.wait_for_function("() => Number(document.querySelector('[data-chart=loss]').dataset.points) > 0", timeout=90_000)
    expect(page.locator(".head-badge")).to_have_attribute("data-state", "succeeded", timeout=120_000)
    page.wait_for_function(
        "() => (window.unrollCharts().loss.series['train/loss'] || []).slice(-1)[0]?.[0] === 150", timeout=20_000
    )
    assert int(page.locator(".charts").get_attribute("data-max-points")) == JOB_MAX_POINTS

    api = dashboard.metrics(job["id"], JOB_SERIES, JOB_MAX_POINTS)
    assert len(api["train/loss"]) <= JOB_MAX_POINTS < 150  # downsampled, keeping extremes
    shown = charts(page)
    assert pairs(shown["loss"]["series"]["train/loss"]) == pairs(api["train/loss"])
    assert pairs(shown["loss"]["series"]["valid/loss"]) == pairs(api["valid/loss"])
    assert pairs(shown["valid"]["series"]["valid/accuracy"]) == pairs(api["valid/accuracy"])
    assert [s for s, _ in api["valid/accuracy"]] == [50, 100, 150]
    norms = shown["grad_norm"]
    assert pairs(norms["series"]["train/grad_norm"]) == pairs(api["train/grad_norm"])
    assert pairs(norms["series"]["train/grad_norm_clipped"]) == pairs(api["train/grad_norm_clipped"])
    assert norms["threshold"] == 0.5  # clip.max_norm, drawn as a line
    clipped_steps = [s for s, v in api["train/clipped"] if v == 1]
    assert clipped_steps, "the run should clip at max_norm 0.5"
    assert [s for s, _ in norms["series"]["clipped"]] == clipped_steps
    assert pairs(shown["tokens_per_s"]["series"]["train/tokens_per_s"]) == pairs(api["train/tokens_per_s"])

    # The rest of the page: history, checkpoints, log tail, config; no cancel for a finished job.
    expect(page.locator(".timeline")).to_contain_text("attempt 1 started")
    expect(page.locator(".timeline")).to_contain_text("finished: succeeded")
    expect(page.locator(".checkpoints")).to_contain_text("Download step 150")
    expect(page.locator("pre.log")).to_contain_text("eval @ 150")
    assert page.locator("pre.log").inner_text().count("eval @ 150") == 1  # live reads never repeat lines
    expect(page.locator("pre.config")).to_contain_text('"max_norm": 0.5')
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
    screenshot(page, "job")


def test_cancel_a_running_job_from_its_page_then_back_to_the_list(page, dashboard, screenshot):
    job = dashboard.submit(config(1_000_000, name="dash-long", train={"eval_every": 100, "checkpoint_every": 0}))
    page.goto("/")
    link = page.get_by_role("link", name="dash-long")
    expect(link).to_be_visible()
    link.focus()
    page.keyboard.press("Enter")  # keyboard navigation inside the app
    expect(page).to_have_url(re.compile(f"/jobs/{job['id']}$"))
    badge = page.locator(".head-badge")
    expect(badge).to_have_attribute("data-state", "running", timeout=90_000)
    page.wait_for_function("() => Number(document.querySelector('[data-chart=loss]').dataset.points) > 5", timeout=30_000)
    # The latest step shown grows: the curve is live. (Not the number of points: past twice
    # the chart's max_points the page re-reads the whole series downsampled, which lowers it.)
    before = int(page.locator("[data-chart=loss]").get_attribute("data-last-step"))
    time.sleep(3)
    assert int(page.locator("[data-chart=loss]").get_attribute("data-last-step")) > before  # still growing, live
    assert int(page.locator(".charts").get_attribute("data-events")) > 2  # driven by the event stream

    screenshot(page, "job-running")
    page.get_by_role("button", name="Cancel").click()
    expect(badge).to_have_attribute("data-state", "cancelled", timeout=30_000)
    expect(page.get_by_role("button", name="Retry")).to_be_enabled()
    assert dashboard.job(job["id"])["state"] == "cancelled"

    page.go_back()
    expect(page).to_have_url(re.compile(r"/$"))
    row = page.locator(f"tr[data-job='{job['id']}']")
    expect(row).to_have_attribute("data-state", "cancelled")
    page.get_by_label("State").select_option("cancelled")
    expect(page).to_have_url(re.compile(r"\?state=cancelled$"))
    expect(row).to_be_visible()
    expect(page.locator("tbody tr:not([data-state=cancelled])")).to_have_count(0)
    page.go_back()
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.get_by_label("State")).to_have_value("")
    screenshot(page, "jobs")


def test_sweep_page_compares_final_metrics_and_overlays_every_members_curves(page, dashboard, screenshot):
    base = config(100, name="dash-sweep", train={"eval_every": 25, "checkpoint_every": 0})
    sweep = dashboard.sweep({"name": "k1-sweep", "base": base, "grid": {"tbptt.k1": [2, 16]}, "seeds": 2, "max_parallel": 2})
    page.goto(f"/sweeps/{sweep['id']}")
    expect(page.get_by_role("heading", name="Sweep k1-sweep")).to_be_visible()
    expect(page.locator(".head-badge")).to_have_attribute("data-state", "succeeded", timeout=180_000)
    summary = dashboard.api.get(f"/v1/sweeps/{sweep['id']}").json()["summary"]
    assert summary["axes"] == ["tbptt.k1"] and summary["metric"] == "valid/accuracy"
    job_ids = [j for row in summary["rows"] for j in row["job_ids"]]
    assert len(job_ids) == 4
    page.wait_for_function(
        f"() => Object.values(window.unrollCharts()['sweep-curves'].series).filter(s => s.length).length === {len(job_ids)}",
        timeout=20_000,
    )

    # The summary table: one row per grid point.
    expect(page.locator("table.summary tbody tr")).to_have_count(2)
    expect(page.locator("tr.best")).to_have_count(1)

    # Final metric against k1: a log axis, mean ± std over the seeds.
    final = charts(page)["sweep-final"]
    assert final["xLog"] is True
    rows = sorted(summary["rows"], key=lambda r: r["point"]["tbptt.k1"])
    assert pairs(final["series"]["valid/accuracy"]) == [(r["point"]["tbptt.k1"], r["final"]["mean"]) for r in rows]
    assert sorted(pairs(final["errors"]["valid/accuracy"])) == [(r["point"]["tbptt.k1"], r["final"]["std"]) for r in rows]

    # Every member's curve, as the API returns it, coloured by its k1.
    shown = charts(page)
    for job_id in job_ids:
        api = dashboard.metrics(job_id, ["valid/accuracy", "train/loss"], CURVE_POINTS)
        assert pairs(shown["sweep-curves"]["series"][job_id]) == pairs(api["valid/accuracy"])
        assert pairs(shown["sweep-loss"]["series"][job_id]) == pairs(api["train/loss"])
    expect(page.locator(".color-key .key")).to_have_count(2)
    screenshot(page, "sweep")


def test_sweep_page_draws_the_rungs_of_early_stopping(page, dashboard):
    """A sweep with early_stop: its rule among the facts, Rung and Steps saved in the table,
    and a dashed line at each rung on the member curves (where a trial not promoted ends)."""
    base = config(100, name="dash-asha", train={"eval_every": 25, "checkpoint_every": 0})
    sweep = dashboard.sweep({
        "name": "asha-sweep", "base": base, "grid": {"tbptt.k1": [2, 16]}, "max_parallel": 1,
        "early_stop": {"min_steps": 25, "reduction_factor": 2},
    })
    try:
        page.goto(f"/sweeps/{sweep['id']}")
        expect(page.get_by_role("heading", name="Sweep asha-sweep")).to_be_visible()
        expect(page.locator(".overview")).to_contain_text("ASHA, reduction factor 2; rungs at 25 · 50 · 100 steps; a trial not promoted is paused")
        headers = page.locator("table.summary thead th")
        expect(headers.filter(has_text="Rung")).to_have_count(1)
        expect(headers.filter(has_text="Steps saved")).to_have_count(1)
        expect(page.locator("table.summary tbody td.rung")).to_have_count(2)
        for chart in ("sweep-curves", "sweep-loss"):
            expect(page.locator(f'figure[data-chart="{chart}"]')).to_have_attribute("data-x-marks", "25,50,100")
        assert charts(page)["sweep-curves"]["xMarks"] == [25, 50, 100]
    finally:
        dashboard.api.post(f"/v1/sweeps/{sweep['id']}/cancel")
