// The sweep page: the summary table (one row per grid point, mean ± std over seeds), the
// final validation metric against the swept value (log axis for truncation lengths, error
// bars over seeds), and every member's curve overlaid, coloured by the swept value.

import { api, ApiError, isFinal, sleep } from "../api";
import { Chart, scaleColor, type LineSpec } from "../charts";
import { announce, bytes, duration, errorBox, facts, h, num, progressBar, replace, stateBadge, time } from "../dom";
import { MetricsFeed } from "../metrics";
import type { EarlyStop, Point, Sweep, SweepRow, SweepSummary } from "../types";
import type { Page } from "./page";

const POLL_MS = 3000;
/** Member curves are many: fewer points each than a job's own charts. */
export const CURVE_POINTS = 200;

/** Axes whose values span orders of magnitude: drawn on a log scale. */
export function isLogAxis(path: string, values: unknown[]): boolean {
  const numeric = values.length > 0 && values.every((v) => typeof v === "number" && v > 0);
  if (!numeric) return false;
  return /^tbptt\.k[12]$/.test(path) || /(^|\.)(lr|weight_decay)$/.test(path);
}

function swatch(color: string): HTMLElement {
  const el = h("span", { class: "swatch", "aria-hidden": "true" });
  el.style.background = color; // CSSOM, which the page's Content-Security-Policy allows
  return el;
}

function label(value: unknown): string {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function pointLabel(point: Record<string, unknown>, axes: string[]): string {
  return axes.map((a) => `${a.split(".").pop()}=${label(point[a])}`).join(", ") || "base";
}

function earlyStopText(e: EarlyStop, rungs: number[]): string {
  const rule = e.mode === "hyperband" ? "Hyperband (brackets of ASHA)" : "ASHA";
  const then = e.resume ? "a trial not promoted is paused and may resume" : "a trial not promoted stops";
  const target = e.target == null ? "" : `; a trial whose ${e.metric} reaches ${e.target} stops there, done`;
  return `${rule}, reduction factor ${e.reduction_factor}; rungs at ${rungs.map((r) => num(r)).join(" · ")} steps; ${then}${target}`;
}

interface Member {
  jobId: string;
  row: SweepRow;
  seedIndex: number;
  state: string | null;
}

export const sweepPage: Page = (root, { params, signal, onDispose }) => {
  const sweepId = params.id;
  let sweep: Sweep | null = null;
  let xAxis: string | null = null;
  const feeds = new Map<string, MetricsFeed>();
  const charts: Chart[] = [];
  onDispose(() => charts.forEach((c) => c.destroy()));

  const title = h("h1", { tabindex: -1 }, sweepId);
  const badge = h("span", { class: "head-badge" });
  const cancel = h("button", { type: "button", class: "danger", id: "cancel-sweep", disabled: true }, "Cancel sweep");
  const actionStatus = h("span", { class: "action-status", role: "status" });
  const overview = h("div", { class: "overview" });
  const problem = h("div");
  const axisPicker = h("div", { class: "axis-picker" });
  const table = h("div", { class: "table-wrap" }, h("p", { class: "muted" }, "Loading…"));
  const legend = h("div", { class: "color-key", "aria-label": "Colour key" });
  const members = h("div", { class: "table-wrap" });

  const finalChart = new Chart({ id: "sweep-final", title: "Final validation metric", series: [], xLabel: "value", padX: true, empty: "No finished member yet." });
  const curves = new Chart({ id: "sweep-curves", title: "Validation curves of all members", series: [], empty: "No evaluation yet." });
  const losses = new Chart({ id: "sweep-loss", title: "Training loss of all members", series: [], yLabel: "train/loss" });
  charts.push(finalChart, curves, losses);

  replace(root,
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "/" }, "Jobs"), " › ", h("span", {}, "Sweep "), h("span", { class: "mono" }, sweepId)),
    h("div", { class: "page-head" }, h("div", { class: "title" }, title, badge), h("div", { class: "actions" }, cancel, actionStatus)),
    problem,
    overview,
    h("section", { "aria-labelledby": "summary-h" }, h("h2", { id: "summary-h" }, "Summary"), table),
    h("section", { "aria-labelledby": "compare-h" },
      h("h2", { id: "compare-h" }, "Comparison"), axisPicker,
      h("div", { class: "charts", "data-curve-points": CURVE_POINTS }, finalChart.element, curves.element, losses.element), legend),
    h("section", { "aria-labelledby": "members-h" }, h("h2", { id: "members-h" }, "Member jobs"), members));

  // -- drawing ---------------------------------------------------------------------------

  function memberList(s: Sweep, summary: SweepSummary): Member[] {
    const states = new Map<string, string>();
    for (const j of s.jobs as unknown[]) {
      if (typeof j === "object" && j !== null) {
        const o = j as Record<string, unknown>;
        const id = String(o.id ?? o.job_id ?? "");
        if (id) states.set(id, String(o.state ?? ""));
      }
    }
    return summary.rows.flatMap((row) => row.job_ids.map((jobId, i) => ({ jobId, row, seedIndex: i, state: states.get(jobId) ?? null })));
  }

  function draw(s: Sweep): void {
    document.title = `${s.name || s.id} · sweep · unroll`;
    title.textContent = s.name ? `Sweep ${s.name}` : `Sweep ${s.id}`;
    replace(badge, stateBadge(s.state));
    badge.dataset.state = s.state;
    cancel.disabled = isFinal(s.state);
    const summary = s.summary;
    replace(overview, facts([
      ["Sweep id", h("span", { class: "mono" }, s.id)],
      ["Grid", h("span", { class: "mono" }, Object.entries(s.grid).map(([p, v]) => `${p} ∈ {${v.map(label).join(", ")}}`).join("; ") || "–")],
      ["Seeds", String(s.seeds)],
      ["Max parallel", s.max_parallel === null ? "no limit" : String(s.max_parallel)],
      ["Created", time(s.created_at)],
      ["Metric", summary ? `${summary.metric} (${summary.goal === "max" ? "higher" : "lower"} is better)` : null],
      ["Best point", summary?.best_point ? h("strong", {}, pointLabel(summary.best_point, summary.axes)) : null],
      ["Early stopping", s.early_stop ? earlyStopText(s.early_stop, summary?.rungs ?? []) : null],
      ["Jobs", h("a", { href: `/?sweep=${encodeURIComponent(s.id)}` }, "list this sweep's jobs")],
    ]));
    if (!summary) {
      replace(table, h("p", { class: "notice" }, "The API returned no summary for this sweep yet."));
      return;
    }
    drawTable(summary);
    drawAxisPicker(summary);
    drawFinal(summary);
    drawCurveSpecs(s, summary);
    drawMembers(s, summary);
  }

  function drawTable(summary: SweepSummary): void {
    const best = summary.best_point ? JSON.stringify(summary.best_point) : null;
    const stat = (x: SweepRow["final"]) =>
      x && x.mean !== null ? h("span", {}, num(x.mean), x.std !== null && x.n > 1 ? h("span", { class: "muted" }, ` ± ${num(x.std)}`) : null, h("span", { class: "muted small" }, ` (n=${x.n})`)) : "–";
    const metricName = summary.metric.split("/").pop();
    const early = Boolean(summary.rungs?.length);
    const rungCells = (row: SweepRow) => (early
      ? [h("td", { class: "num rung" }, num(row.rung ?? null)), h("td", { class: "num" }, num(row.steps_saved ?? null))]
      : []);
    replace(table, h("table", { class: "summary" },
      h("caption", { class: "sr-only" }, `One row per grid point; ${summary.metric} as mean ± standard deviation over seeds`),
      h("thead", {}, h("tr", {},
        ...summary.axes.map((a) => h("th", { scope: "col", class: "mono" }, a)),
        ...["Done", `Final ${metricName}`, `Best ${metricName}`, "Steps", "Wall", "Tokens/s", "Peak memory", "Clipped", "Skipped",
          ...(early ? ["Rung", "Steps saved"] : []), "Jobs"]
          .map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, ...summary.rows.map((row) => {
        const isBest = best !== null && JSON.stringify(row.point) === best;
        return h("tr", { class: isBest ? "best" : "", "data-point": JSON.stringify(row.point) },
          ...summary.axes.map((a, i) => (i === 0
            ? h("th", { scope: "row" }, label(row.point[a]), isBest ? h("span", { class: "best-mark", title: "best point" }, " ★ best") : null)
            : h("td", {}, label(row.point[a])))),
          h("td", { class: "num" }, `${row.jobs_done} / ${row.jobs_total}`),
          h("td", { class: "num" }, stat(row.final)),
          h("td", { class: "num" }, stat(row.best)),
          h("td", { class: "num" }, num(row.steps)),
          h("td", { class: "num" }, duration(row.wall_s)),
          h("td", { class: "num" }, num(row.tokens_per_s)),
          h("td", { class: "num" }, bytes(row.peak_memory_bytes)),
          h("td", { class: "num" }, row.clipped_fraction === null ? "–" : `${(row.clipped_fraction * 100).toFixed(1)}%`),
          h("td", { class: "num" }, num(row.skipped_steps)),
          ...rungCells(row),
          h("td", {}, ...row.job_ids.map((id, i) => h("a", { href: `/jobs/${encodeURIComponent(id)}`, class: "mono small job-link", title: id }, `#${i + 1}`))));
      }))));
  }

  function drawAxisPicker(summary: SweepSummary): void {
    if (!xAxis || !summary.axes.includes(xAxis)) {
      xAxis = summary.axes.find((a) => /^tbptt\./.test(a)) ?? summary.axes[0] ?? null;
    }
    if (summary.axes.length < 2) {
      axisPicker.replaceChildren();
      return;
    }
    if (axisPicker.querySelector("select")) return;
    const select = h("select", { id: "x-axis" }, ...summary.axes.map((a) => h("option", { value: a, selected: a === xAxis }, a)));
    select.addEventListener("change", () => {
      xAxis = select.value;
      if (sweep) draw(sweep);
    });
    replace(axisPicker, h("label", { for: "x-axis" }, "Horizontal axis and colour: "), select);
  }

  /** Position of a swept value on the colour scale (log for log axes). */
  function colorOf(summary: SweepSummary, value: unknown): string {
    if (!xAxis) return scaleColor(0);
    const values = [...new Set(summary.rows.map((r) => r.point[xAxis!]))];
    const numeric = values.every((v) => typeof v === "number");
    if (!numeric) {
      const sorted = values.map(label).sort();
      return scaleColor(sorted.length > 1 ? sorted.indexOf(label(value)) / (sorted.length - 1) : 0);
    }
    const log = isLogAxis(xAxis, values);
    const f = (v: number) => (log ? Math.log(v) : v);
    const nums = (values as number[]).map(f);
    const lo = Math.min(...nums);
    const hi = Math.max(...nums);
    return scaleColor(hi > lo ? (f(value as number) - lo) / (hi - lo) : 0);
  }

  function drawFinal(summary: SweepSummary): void {
    if (!xAxis) {
      replace(legend);
      return;
    }
    const axis = xAxis;
    const values = [...new Set(summary.rows.map((r) => r.point[axis]))];
    const numeric = values.every((v) => typeof v === "number");
    const categories = numeric ? undefined : values.map(label).sort();
    const log = isLogAxis(axis, values);
    const x = (v: unknown) => (categories ? categories.indexOf(label(v)) : (v as number));
    // One series per combination of the other axes.
    const others = summary.axes.filter((a) => a !== axis);
    const groups = new Map<string, SweepRow[]>();
    for (const row of summary.rows) {
      const key = pointLabel(row.point, others);
      groups.set(key, [...(groups.get(key) ?? []), row]);
    }
    const specs: LineSpec[] = [];
    const series: Record<string, Point[]> = {};
    const errors: Record<string, Array<[number, number]>> = {};
    [...groups.entries()].forEach(([key, rows], i) => {
      const name = others.length ? key : summary.metric;
      specs.push({ name, label: others.length ? key : `${summary.metric} (mean ± std)`, color: groups.size > 1 ? scaleColor(i / (groups.size - 1)) : "#1565c0", dots: true, width: 2 });
      const points = rows.filter((r) => r.final && r.final.mean !== null).map((r) => [x(r.point[axis]), r.final!.mean] as Point).sort((a, b) => a[0] - b[0]);
      series[name] = points;
      errors[name] = rows.filter((r) => r.final && r.final.mean !== null && r.final.std !== null).map((r) => [x(r.point[axis]), r.final!.std!] as [number, number]);
    });
    const shape = JSON.stringify([axis, specs.map((s) => [s.name, s.color]), categories, log]);
    if (finalChart.element.dataset.shape !== shape) {
      finalChart.element.dataset.shape = shape;
      finalChart.setAxis(axis, categories, log, numeric ? (values as number[]).slice().sort((p, q) => p - q) : undefined);
      finalChart.setSpecs(specs);
    }
    finalChart.element.querySelector("figcaption")!.textContent =
      `Final ${summary.metric} against ${axis}${log ? " (log scale)" : ""}, mean ± std over seeds`;
    finalChart.element.dataset.axis = axis;
    finalChart.set(series, errors);
    const seen = (numeric ? (values as number[]).sort((a, b) => a - b) : categories!).map((v) => [v, colorOf(summary, v)] as const);
    replace(legend, h("span", { class: "muted" }, `Curves coloured by ${axis}: `),
      ...seen.map(([v, c]) => h("span", { class: "key" }, swatch(c), label(v))));
  }

  function drawCurveSpecs(s: Sweep, summary: SweepSummary): void {
    const list = memberList(s, summary);
    const others = summary.axes;
    const specs = (name: string): LineSpec[] => list.map((m) => ({
      name: m.jobId,
      label: `${pointLabel(m.row.point, others)}${m.row.job_ids.length > 1 ? ` #${m.seedIndex + 1}` : ""}`,
      color: colorOf(summary, xAxis ? m.row.point[xAxis] : null),
      width: 1.5,
      dots: name !== "train/loss",
    }));
    const marks = (summary.rungs ?? []).map((step, i) => ({ value: step, label: `rung ${i}` }));
    if ((curves.element.dataset.xMarks ?? "") !== marks.map((m) => m.value).join(",")) {
      curves.setXMarks(marks); // where trials are judged: a curve that ends at one was not promoted
      losses.setXMarks(marks);
    }
    const ids = list.map((m) => m.jobId).join();
    if (curves.element.dataset.members !== ids || curves.element.dataset.axis !== String(xAxis)) {
      curves.setSpecs(specs(summary.metric));
      losses.setSpecs(specs("train/loss"));
      curves.element.dataset.members = ids;
      curves.element.dataset.axis = String(xAxis);
      curves.element.dataset.metric = summary.metric;
      curves.element.querySelector("figcaption")!.textContent = `${summary.metric} of all members`;
    }
    for (const m of list) {
      if (!feeds.has(m.jobId)) feeds.set(m.jobId, new MetricsFeed(m.jobId, [summary.metric, "train/loss"], CURVE_POINTS));
    }
  }

  function drawCurves(metric: string): void {
    const metricSeries: Record<string, Point[]> = {};
    const lossSeries: Record<string, Point[]> = {};
    for (const [id, feed] of feeds) {
      metricSeries[id] = feed.data[metric] ?? [];
      lossSeries[id] = feed.data["train/loss"] ?? [];
    }
    curves.set(metricSeries);
    losses.set(lossSeries);
  }

  function drawMembers(s: Sweep, summary: SweepSummary): void {
    const list = memberList(s, summary);
    replace(members, h("table", { class: "compact" },
      h("thead", {}, h("tr", {}, ...["Job", "Point", "Seed", "State"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, ...list.map((m) => {
        const detail = (s.jobs as unknown[]).find((j) => typeof j === "object" && j !== null && ((j as any).id ?? (j as any).job_id) === m.jobId) as any;
        return h("tr", {},
          h("td", {}, h("a", { href: `/jobs/${encodeURIComponent(m.jobId)}`, class: "mono" }, m.jobId)),
          h("td", {}, pointLabel(m.row.point, summary.axes)),
          h("td", { class: "num" }, detail?.config?.train?.seed ?? detail?.seed ?? `#${m.seedIndex + 1}`),
          h("td", {}, m.state ? stateBadge(m.state) : "–", detail && typeof detail.progress === "number" && m.state === "running" ? progressBar(detail.progress, `progress of ${m.jobId}`) : null));
      }))));
  }

  // -- reading ---------------------------------------------------------------------------

  // Members whose curves were read after they finished: nothing more to read for them.
  const settled = new Set<string>();

  async function loadCurves(): Promise<void> {
    if (!sweep?.summary) return;
    const sweepDone = isFinal(sweep.state);
    const due = memberList(sweep, sweep.summary).filter((m) => !settled.has(m.jobId));
    let changed = false;
    for (let i = 0; i < due.length; i += 6) {
      const batch = due.slice(i, i + 6);
      const done = batch.map((m) => sweepDone || (m.state !== null && isFinal(m.state)));
      // A member that has just finished gets one full read: then it equals the API's series.
      const results = await Promise.allSettled(batch.map((m, k) => feeds.get(m.jobId)!.refresh(signal, done[k])));
      results.forEach((r, k) => {
        if (r.status !== "fulfilled") return;
        if (done[k]) settled.add(batch[k].jobId);
        changed ||= r.value;
      });
    }
    if (changed) drawCurves(sweep.summary.metric);
  }

  async function load(): Promise<Sweep> {
    const fresh = await api<Sweep>(`/v1/sweeps/${encodeURIComponent(sweepId)}`, { signal });
    if (sweep && sweep.state !== fresh.state) announce(`Sweep is ${fresh.state}`);
    sweep = fresh;
    draw(fresh);
    await loadCurves();
    return fresh;
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    actionStatus.textContent = "Cancelling…";
    try {
      const result = await api<{ cancelled: number }>(`/v1/sweeps/${encodeURIComponent(sweepId)}/cancel`, { method: "POST", signal });
      actionStatus.textContent = `Cancel requested for ${result.cancelled} job${result.cancelled === 1 ? "" : "s"}.`;
      await load();
    } catch (error) {
      actionStatus.textContent = `Cancel failed: ${(error as Error).message}`;
      cancel.disabled = false;
    }
  });

  (async () => {
    while (!signal.aborted) {
      try {
        const s = await load();
        replace(problem);
        if (isFinal(s.state)) return;
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError && error.status === 404) {
          document.title = "Not found · unroll";
          replace(root, h("h1", { tabindex: -1 }, "Sweep not found"),
            h("p", {}, `There is no sweep ${sweepId} in this project. `, h("a", { href: "/" }, "Back to the jobs")));
          return;
        }
        if (error instanceof ApiError && error.status === 401) return;
        replace(problem, errorBox(`Could not load the sweep: ${(error as Error).message}`));
      }
      await sleep(document.hidden ? POLL_MS * 5 : POLL_MS, signal);
    }
  })();
};
