"""The job page puts the job's model to work (issue 15 part 6), in Chromium against the live
stack: a text job's "generate" box streams a continuation from the prompt, and a
time-series job's page plots its one-step-ahead forecast against the validation data,
holding exactly what GET /v1/jobs/{id}/forecast gives."""

from __future__ import annotations

import math

import pytest
from playwright.sync_api import expect

from tests.trainer.usage import series_rows, text

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(240)]


def upload(dashboard, name: str, content: str) -> str:
    r = dashboard.api.post("/v1/datasets", params={"name": name}, content=content.encode())
    assert r.status_code == 201, r.text
    return r.json()["id"]


def trained(dashboard, data: dict) -> str:
    job = dashboard.submit({
        "model": {"cell": "gru", "hidden_size": 16},
        "data": data,
        "tbptt": {"k1": 12},
        "train": {"max_steps": 30, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"},
        "resources": {"cpus": 1},
    })
    done = dashboard.wait(job["id"], {"succeeded", "failed", "cancelled"}, timeout=150)
    assert done["state"] == "succeeded", done
    return job["id"]


def test_a_text_jobs_page_generates_from_a_prompt(page, dashboard, screenshot):
    corpus = upload(dashboard, "words.txt", text(300, seed=1))
    job_id = trained(dashboard, {"kind": "text", "dataset": corpus, "batch_size": 4})
    page.goto(f"/jobs/{job_id}")
    expect(page.get_by_role("heading", name="Generate")).to_be_visible()
    page.locator("#generate-prompt").fill("the cat Q")
    page.locator("#generate-length").fill("80")
    page.locator("#generate-temperature").fill("0.5")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#generated")).to_have_attribute("data-done", "true", timeout=30_000)
    generated = page.locator("#generated").inner_text()
    assert len(generated) == 80  # characters: one a token
    status = page.locator("#generate-status")
    expect(status).to_contain_text("80 tokens from the model of step 30")
    expect(status).to_contain_text('"Q"')  # outside the vocabulary, and said so
    # A bad length is refused by the API, naming the field, and the page says so.
    page.locator("#generate-length").evaluate("el => { el.removeAttribute('max'); el.value = '1000000'; }")
    page.get_by_role("button", name="Generate").click()
    expect(status).to_contain_text("max_tokens")
    screenshot(page, "job-generate")


def test_a_time_series_jobs_page_plots_its_forecast_against_the_validation_data(page, dashboard, screenshot):
    rows = series_rows(400, seed=5)
    csv = "load,temp\n" + "".join(f"{r['load']},{r['temp']}\n" for r in rows)
    dataset = upload(dashboard, "load.csv", csv)
    job_id = trained(dashboard, {"kind": "timeseries", "dataset": dataset, "target": "load", "batch_size": 4, "valid_fraction": 0.25})
    page.goto(f"/jobs/{job_id}")
    expect(page.get_by_role("heading", name="Forecast")).to_be_visible()
    page.wait_for_function("() => (window.unrollCharts().forecast?.series.actual || []).length > 0", timeout=30_000)
    shown = page.evaluate("window.unrollCharts().forecast.series")
    api = dashboard.api.get(f"/v1/jobs/{job_id}/forecast", params={"rows": 500}).json()
    assert len(api["actual"]) == 99  # the 100 validation rows, each but the first forecast from those before
    assert [p[1] for p in shown["actual"]] == pytest.approx(api["actual"])
    assert [p[1] for p in shown["forecast"]] == pytest.approx(api["forecast"])
    assert shown["actual"][0][0] == api["first_row"] == 301
    assert all(math.isfinite(v) for v in api["forecast"])
    expect(page.locator("#forecast-status")).to_contain_text("load: the model of step 30")
    screenshot(page, "job-forecast")


def test_an_adaptive_jobs_page_draws_the_truncation_it_chose(page, dashboard):
    """tbptt.mode adaptive: train/k2, the measured decay and the estimated bias (issue 17)."""
    job = dashboard.submit({
        "model": {"cell": "gru", "hidden_size": 16},
        "data": {"kind": "recall", "vocab": 4, "lag": 3, "length": 2000, "batch_size": 4, "valid_length": 64},
        "tbptt": {"mode": "adaptive", "k1": 4, "k_min": 2, "k_max": 12, "adapt_every": 10},
        "train": {"max_steps": 40, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"},
    })
    done = dashboard.wait(job["id"], {"succeeded", "failed", "cancelled"}, timeout=150)
    assert done["state"] == "succeeded", done["error"]
    page.goto(f"/jobs/{job['id']}")
    page.wait_for_function("() => (window.unrollCharts().truncation?.series['train/k2'] || []).length > 0", timeout=30_000)
    shown = page.evaluate("window.unrollCharts()")
    api = dashboard.metrics(job["id"], ["train/k2", "train/decay_rate", "train/bias"], 500)
    assert [tuple(p) for p in shown["truncation"]["series"]["train/k2"]] == [tuple(p) for p in api["train/k2"]]
    assert [tuple(p) for p in shown["decay"]["series"]["train/decay_rate"]] == [tuple(p) for p in api["train/decay_rate"]]
    assert api["train/bias"] and all(2 <= k <= 12 for _, k in api["train/k2"])
