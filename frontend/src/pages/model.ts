// Using the job's model on its page: a text job gets a "generate" box (prompt, length,
// temperature) whose continuation streams in as the API samples it (POST
// /v1/jobs/{id}/generate, Server-Sent Events); a time-series job gets its one-step-ahead
// forecast plotted against the validation data (GET /v1/jobs/{id}/forecast). Both use the
// job's model artifact once it completed, else its latest checkpoint.

import { api, ApiError, readEvents } from "../api";
import { Chart, PALETTE } from "../charts";
import { h, replace } from "../dom";
import type { Job, Point } from "../types";

// trainer/inference.py's bounds (the API checks them too).
const MAX_TOKENS = 10_000;
const MAX_PROMPT_CHARS = 100_000;
const FORECAST_ROWS = 500;

export interface ModelPanel {
  element: HTMLElement;
  /** Read again what depends on the job's model (after a new checkpoint or the end). */
  refresh(): void;
  destroy(): void;
}

export function modelPanel(job: Job, signal: AbortSignal): ModelPanel | null {
  const kind = job.config?.data?.kind;
  if (kind === "text") return generateBox(job.id, signal);
  if (kind === "timeseries") return forecastPlot(job.id, signal);
  return null;
}

function generateBox(jobId: string, pageSignal: AbortSignal): ModelPanel {
  const prompt = h("textarea", { id: "generate-prompt", rows: 3, maxlength: MAX_PROMPT_CHARS, required: true }, "The ");
  const length = h("input", { id: "generate-length", type: "number", min: 1, max: MAX_TOKENS, value: 200, required: true });
  const temperature = h("input", { id: "generate-temperature", type: "number", min: 0, max: 5, step: 0.1, value: 0.8, required: true });
  const run = h("button", { type: "submit", id: "generate-run" }, "Generate");
  const stop = h("button", { type: "button", id: "generate-stop", disabled: true }, "Stop");
  const status = h("p", { class: "muted small", role: "status", id: "generate-status" });
  const output = h("pre", { class: "generated", id: "generated", "aria-live": "polite", tabindex: 0 }, "");
  const form = h("form", { class: "generate", "aria-label": "Generate text" },
    h("label", { for: "generate-prompt" }, "Prompt"), prompt,
    h("div", { class: "row" },
      h("label", {}, "Tokens ", length), h("label", {}, "Temperature ", temperature), run, stop),
    status, output);
  let running: AbortController | null = null;
  pageSignal.addEventListener("abort", () => running?.abort(), { once: true });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    running?.abort();
    const controller = new AbortController();
    running = controller;
    run.disabled = true;
    stop.disabled = false;
    output.textContent = "";
    output.dataset.done = "false";
    status.textContent = "Sampling…";
    let text = "";
    try {
      await readEvents(`/v1/jobs/${encodeURIComponent(jobId)}/generate`, (e) => {
        const data = e.data as Record<string, any>;
        if (e.event === "token") {
          text += String(data.text ?? "");
          output.textContent = text;
        } else if (e.event === "done") {
          const unknown = (data.unknown as string[] | undefined) ?? [];
          status.textContent = `${data.tokens} tokens from the model of step ${data.step}` +
            (unknown.length ? `; read as unknown: ${unknown.map((u) => JSON.stringify(u)).join(" ")}` : "");
          output.dataset.done = "true";
        } else if (e.event === "error") {
          status.textContent = `Stopped: ${data.message ?? "the model failed"}`;
        }
      }, controller.signal, undefined, {
        prompt: prompt.value, max_tokens: Number(length.value), temperature: Number(temperature.value),
      });
    } catch (error) {
      if (!controller.signal.aborted) {
        status.textContent = error instanceof ApiError ? `${error.field ? `${error.field}: ` : ""}${error.message}` : `Failed: ${(error as Error).message}`;
      } else if (!pageSignal.aborted) {
        status.textContent = "Stopped.";
      }
    } finally {
      if (running === controller) running = null;
      run.disabled = false;
      stop.disabled = true;
    }
  });
  stop.addEventListener("click", () => running?.abort());

  const element = h("section", { "aria-labelledby": "model-h", class: "model-panel" },
    h("h2", { id: "model-h" }, "Generate"), form);
  return { element, refresh: () => undefined, destroy: () => running?.abort() };
}

interface Forecast {
  step: number;
  target: string;
  first_row: number;
  actual: number[];
  forecast: number[];
}

function forecastPlot(jobId: string, signal: AbortSignal): ModelPanel {
  const note = h("p", { class: "muted small", id: "forecast-status" }, "Loading…");
  const chart = new Chart({ id: "forecast", title: "Forecast on the validation data", xLabel: "row", yLabel: "value", series: [
    { name: "actual", label: "validation data", color: PALETTE.valid, width: 2 },
    { name: "forecast", label: "one step ahead", color: PALETTE.train, dash: [4, 3] },
  ], empty: "No forecast yet." });
  const element = h("section", { "aria-labelledby": "forecast-h", class: "model-panel" },
    h("h2", { id: "forecast-h" }, "Forecast"), note, chart.element);

  async function load(): Promise<void> {
    try {
      const f = await api<Forecast>(`/v1/jobs/${encodeURIComponent(jobId)}/forecast`, { query: { rows: FORECAST_ROWS }, signal });
      const at = (values: number[]): Point[] => values.map((v, i) => [f.first_row + i, v]);
      chart.set({ actual: at(f.actual), forecast: at(f.forecast) });
      note.textContent = `${f.target}: the model of step ${f.step}, each row forecast from the rows before it` +
        ` (validation rows ${f.first_row}–${f.first_row + f.actual.length - 1}).`;
    } catch (error) {
      if (signal.aborted) return;
      replace(note, error instanceof ApiError && error.status === 409 ? error.message : `Could not load the forecast: ${(error as Error).message}`);
    }
  }
  void load();
  return { element, refresh: () => void load(), destroy: () => chart.destroy() };
}
