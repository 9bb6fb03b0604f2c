// The compare page: any jobs of the project side by side (GET /v1/compare), whatever their
// sweep or state: one metric of all of them overlaid on one step axis (any metric they
// have, a log scale, smoothing), the final values, and the configuration paths that differ.
// Everything the page shows is in its URL (/compare?jobs=a,b&metric=valid/loss&log=1&smooth=0.6),
// so a link shares the view; the page follows running jobs until they end.

import { api, ApiError, isFinal, sleep } from "../api";
import { Chart, type LineSpec } from "../charts";
import { errorBox, h, num, replace, stateBadge } from "../dom";
import type { AlignedSeries, ComparedJob, Comparison, Point } from "../types";
import type { Page } from "./page";

/** The most jobs one comparison holds (service.store.limits.MAX_COMPARE_JOBS). */
export const MAX_COMPARE_JOBS = 20;
/** Steps per aligned series: about one per pixel of a laptop-width chart. */
const MAX_POINTS = 1000;
const POLL_MS = 3000;
/** Categorical colours, distinct for neighbours (Tableau 10). */
const COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

/** The job ids of `?jobs=a,b` (each once, in order). */
export function parseJobIds(text: string | null): string[] {
  const ids = (text ?? "").split(",").map((s) => s.trim()).filter(Boolean);
  return [...new Set(ids)];
}

/** The URL of a comparison; commas stay literal so the link reads well. */
export function compareUrl(ids: string[], view: { metric?: string | null; log?: boolean; smooth?: number } = {}): string {
  const parts = [`jobs=${ids.map(encodeURIComponent).join(",")}`];
  if (view.metric) parts.push(`metric=${encodeURIComponent(view.metric)}`);
  if (view.log) parts.push("log=1");
  if (view.smooth) parts.push(`smooth=${view.smooth}`);
  return `/compare?${parts.join("&")}`;
}

/** TensorBoard's smoothing: an exponential moving average, debiased at the start (so the
 *  first points are not pulled towards 0). Non-finite points stay null and do not move it. */
export function smooth(points: Point[], weight: number): Point[] {
  if (!(weight > 0)) return points;
  let last = 0;
  let n = 0;
  return points.map(([x, y]) => {
    if (y === null) return [x, null];
    last = last * weight + (1 - weight) * y;
    n += 1;
    return [x, last / (1 - weight ** n)];
  });
}

/** One job's points of an aligned table: its values where it has a point, and null at
 *  its non-finite steps (drawn as ×). */
export function jobPoints(table: AlignedSeries | undefined, jobId: string): Point[] {
  if (!table) return [];
  const values = table.values[jobId] ?? [];
  const nonfinite = new Set(table.nonfinite[jobId] ?? []);
  const out: Point[] = [];
  table.steps.forEach((step, i) => {
    const v = values[i];
    if (v !== null && v !== undefined) out.push([step, v]);
    else if (nonfinite.has(step)) out.push([step, null]);
  });
  return out;
}

function label(value: unknown): string {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function jobLabel(j: ComparedJob): string {
  return j.name ? `${j.name} (${j.id})` : j.id;
}

export const comparePage: Page = (root, { url, signal, onDispose }) => {
  document.title = "Compare · unroll";
  const ids = parseJobIds(url.searchParams.get("jobs"));
  const crumbs = h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "/" }, "Jobs"), " › ", h("span", {}, "Compare"));
  if (!ids.length) {
    replace(root, crumbs, h("h1", { tabindex: -1 }, "Compare jobs"),
      h("p", {}, "Tick the jobs to compare on the ", h("a", { href: "/" }, "jobs page"), " and press “Compare selected”, ",
        "or open ", h("code", {}, "/compare?jobs=job_a,job_b"), ". Jobs of any sweep and any state can be compared."));
    return;
  }
  let metric = url.searchParams.get("metric");
  let log = url.searchParams.get("log") === "1";
  let weight = Math.min(0.99, Math.max(0, Number(url.searchParams.get("smooth")) || 0));
  let comparison: Comparison | null = null;

  const chart = new Chart({ id: "compare", title: "", series: [], yLog: log, empty: "No points of this metric yet." });
  onDispose(() => chart.destroy());

  const metricSelect = h("select", { id: "compare-metric", name: "metric" });
  const logBox = h("input", { id: "compare-log", type: "checkbox", checked: log });
  logBox.style.width = "auto"; // CSSOM (the page's CSP allows it); .filters widens inputs
  const smoothInput = h("input", { id: "compare-smooth", type: "range", min: 0, max: 0.99, step: 0.01, value: weight });
  const smoothValue = h("output", { for: "compare-smooth", id: "compare-smooth-value" }, weight.toFixed(2));
  const controls = h("div", { class: "filters", role: "group", "aria-label": "Chart options" },
    h("label", { for: "compare-metric" }, "Metric"), metricSelect,
    h("label", { for: "compare-log" }, logBox, " Log scale"),
    h("label", { for: "compare-smooth" }, "Smoothing"), smoothInput, smoothValue);
  const problem = h("div");
  const note = h("p", { class: "muted small", id: "compare-note" });
  const jobsTable = h("div", { class: "table-wrap", id: "compare-jobs" }, h("p", { class: "muted" }, "Loading…"));
  const configTable = h("div", { class: "table-wrap", id: "compare-config" });
  const share = h("a", { href: location.pathname + location.search, id: "compare-link" }, "Link to this comparison");

  replace(root, crumbs,
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, `Compare ${ids.length} job${ids.length === 1 ? "" : "s"}`), share),
    problem,
    h("section", { "aria-labelledby": "compare-jobs-h" }, h("h2", { id: "compare-jobs-h" }, "Jobs"), jobsTable),
    h("section", { "aria-labelledby": "compare-chart-h" }, h("h2", { id: "compare-chart-h" }, "Metrics"), controls,
      h("div", { class: "charts" }, chart.element), note),
    h("section", { "aria-labelledby": "compare-config-h" }, h("h2", { id: "compare-config-h" }, "Configuration differences"), configTable));

  /** The view in the address bar (replaced, not pushed: the back button leaves the page). */
  function remember(): void {
    const to = compareUrl(ids, { metric, log, smooth: weight });
    history.replaceState(null, "", to);
    share.setAttribute("href", to);
    root.dataset.metric = metric ?? "";
    root.dataset.log = String(log);
    root.dataset.smooth = String(weight);
  }

  // -- drawing ---------------------------------------------------------------------------

  function draw(c: Comparison): void {
    drawJobs(c);
    drawMetricPicker(c);
    drawChart(c);
    drawConfig(c);
  }

  function drawJobs(c: Comparison): void {
    replace(jobsTable, h("table", { class: "compact" },
      h("thead", {}, h("tr", {}, ...["", "Job", "State", "Sweep", "Step", `Final ${metric ?? ""}`].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, ...c.jobs.map((j, i) => {
        const final = metric ? j.final[metric] : undefined;
        return h("tr", { "data-job": j.id },
          h("td", {}, swatch(COLORS[i % COLORS.length])),
          h("th", { scope: "row" }, h("a", { href: `/jobs/${encodeURIComponent(j.id)}` }, j.name || j.id), j.name ? h("div", { class: "muted mono small" }, j.id) : null),
          h("td", {}, stateBadge(j.state)),
          h("td", {}, j.sweep_id ? h("a", { href: `/sweeps/${encodeURIComponent(j.sweep_id)}`, class: "mono small" }, j.sweep_id) : "–"),
          h("td", { class: "num" }, `${j.step}${j.max_steps ? ` / ${j.max_steps}` : ""}`),
          h("td", { class: "num", "data-final": final ? String(final.value) : "" },
            final ? (final.value === null ? "non-finite" : num(final.value)) : "–", final ? h("span", { class: "muted small" }, ` @ ${final.step}`) : null));
      }))));
  }

  function drawMetricPicker(c: Comparison): void {
    const names = [...new Set([...c.available_metrics, ...(metric ? [metric] : [])])].sort();
    const shown = [...metricSelect.options].map((o) => o.value).join();
    if (shown !== names.join()) replace(metricSelect, ...names.map((n) => h("option", { value: n }, n)));
    metricSelect.value = metric ?? "";
  }

  function drawChart(c: Comparison): void {
    if (!metric) return;
    const table = c.series[metric];
    const sparse = (table?.steps.length ?? 0) <= 60;
    const specs: LineSpec[] = c.jobs.map((j, i) => ({ name: j.id, label: jobLabel(j), color: COLORS[i % COLORS.length], width: 1.5, dots: sparse }));
    const shape = JSON.stringify([metric, specs.map((s) => [s.name, s.label, s.dots])]);
    if (chart.element.dataset.shape !== shape) {
      chart.element.dataset.shape = shape;
      chart.setSpecs(specs);
    }
    chart.setYLog(log);
    chart.element.dataset.metric = metric;
    chart.element.querySelector("figcaption")!.textContent =
      `${metric} by step${log ? ", log scale" : ""}${weight > 0 ? `, smoothed (${weight.toFixed(2)})` : ""}`;
    let hidden = 0;
    const series: Record<string, Point[]> = {};
    for (const j of c.jobs) {
      let points = smooth(jobPoints(table, j.id), weight);
      if (log) {
        const kept = points.filter(([, y]) => y === null || y > 0);
        hidden += points.length - kept.length;
        points = kept;
      }
      series[j.id] = points;
    }
    chart.set(series);
    note.textContent = hidden ? `${hidden} value${hidden === 1 ? " is" : "s are"} not positive: not drawn on a log scale.` : "";
  }

  function drawConfig(c: Comparison): void {
    if (!c.config_diff.length) {
      replace(configTable, h("p", { class: "muted" }, "The configurations are identical."));
      return;
    }
    replace(configTable, h("table", { class: "compact config-diff" },
      h("caption", { class: "sr-only" }, "Configuration paths whose values differ, one column per job"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Setting"), ...c.jobs.map((j) => h("th", { scope: "col" }, j.name || j.id)))),
      h("tbody", {}, ...c.config_diff.map((row) => h("tr", { "data-key": row.key },
        h("th", { scope: "row", class: "mono" }, row.key),
        ...c.jobs.map((j) => h("td", { class: "mono" }, j.id in row.values ? label(row.values[j.id]) : h("span", { class: "muted" }, "(unset)"))))))));
  }

  // -- reading ---------------------------------------------------------------------------

  let reads = 0;

  async function load(): Promise<Comparison> {
    const read = ++reads;
    const c = await api<Comparison>("/v1/compare", {
      query: { jobs: ids, metrics: metric ? [metric] : undefined, max_points: MAX_POINTS },
      signal,
    });
    if (read !== reads) return c; // a newer read (another metric) is under way: it draws
    if (!metric) {
      // The tasks' own metrics first (after train/loss and valid/loss), if any has points.
      const measured = c.metrics.filter((m) => (c.series[m]?.steps.length ?? 0) > 0);
      metric = measured.find((m) => m !== "train/loss" && m !== "valid/loss") ?? measured[0] ?? c.metrics[0];
      remember();
    }
    comparison = c;
    draw(c);
    return c;
  }

  async function refresh(): Promise<boolean> {
    try {
      const c = await load();
      replace(problem);
      return c.jobs.every((j) => isFinal(j.state));
    } catch (error) {
      if (signal.aborted) return true;
      if (error instanceof ApiError && error.status === 401) return true;
      const what = error instanceof ApiError && error.status === 404 ? "A job of this comparison does not exist in this project" : "Could not load the comparison";
      replace(problem, errorBox(`${what}: ${(error as Error).message}`));
      return error instanceof ApiError && (error.status === 404 || error.status === 422);
    }
  }

  metricSelect.addEventListener("change", () => {
    metric = metricSelect.value;
    remember();
    void refresh();
  });
  logBox.addEventListener("change", () => {
    log = logBox.checked;
    remember();
    if (comparison) drawChart(comparison);
  });
  smoothInput.addEventListener("input", () => {
    weight = Number(smoothInput.value);
    smoothValue.textContent = weight.toFixed(2);
    remember();
    if (comparison) drawChart(comparison);
  });

  remember();
  (async () => {
    while (!signal.aborted) {
      if (await refresh()) return;
      await sleep(document.hidden ? POLL_MS * 5 : POLL_MS, signal);
    }
  })();
};

function swatch(color: string): HTMLElement {
  const el = h("span", { class: "swatch", "aria-hidden": "true" });
  el.style.background = color; // CSSOM, which the page's Content-Security-Policy allows
  return el;
}
