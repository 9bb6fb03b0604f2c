// Line charts on uPlot. A Chart keeps its series as the API returns them ([step, value]
// pairs, value null when not finite) and exposes exactly that data to the page
// (window.unrollCharts(), and data-* attributes on the figure) so tests can compare the
// chart with GET /v1/jobs/{id}/metrics.

import uPlot from "uplot";
import { h } from "./dom";
import type { Point } from "./types";

export interface LineSpec {
  name: string; // the key of the data (a metric name, a job id)
  label: string;
  color: string;
  dash?: number[];
  width?: number;
  /** Markers only, no line (clipped steps). */
  pointsOnly?: boolean;
  /** Draw a dot on every point (sparse series such as evaluations). */
  dots?: boolean;
}

export interface ChartOptions {
  id: string;
  title: string;
  series: LineSpec[];
  xLabel?: string;
  yLabel?: string;
  xLog?: boolean;
  /** A log-10 value axis (only positive values are drawn). */
  yLog?: boolean;
  /** Category labels: x values are indices into this list. */
  xCategories?: string[];
  height?: number;
  /** A horizontal reference line (the clip threshold). */
  threshold?: { value: number; label: string } | null;
  /** Vertical reference lines at these x values (a sweep's early-stopping rungs). */
  xMarks?: Array<{ value: number; label: string }>;
  /** Leave room around the first and last x (points with error bars at the edges). */
  padX?: boolean;
  /** Ticks exactly at these x values (the swept values) instead of uPlot's choice. */
  xTicks?: number[];
  /** Charts with the same key share the cursor (the charts of one job). */
  syncKey?: string;
  empty?: string;
}

export interface ChartSnapshot {
  title: string;
  series: Record<string, Point[]>;
  errors: Record<string, Array<[number, number]>>;
  threshold: number | null;
  xMarks: number[];
  xLog: boolean;
  yLog: boolean;
}

const mounted = new Map<string, Chart>();

declare global {
  interface Window {
    unrollCharts: () => Record<string, ChartSnapshot>;
  }
}

window.unrollCharts = () => {
  const out: Record<string, ChartSnapshot> = {};
  for (const [id, chart] of mounted) out[id] = chart.snapshot();
  return out;
};

const NONFINITE = "#c62828";

export class Chart {
  readonly element: HTMLElement;
  private plot: uPlot | null = null;
  private readonly canvas: HTMLElement;
  private readonly note: HTMLElement;
  private data: Record<string, Point[]> = {};
  private errors: Record<string, Map<number, number>> = {};
  private observer: ResizeObserver;
  private frame = 0;

  constructor(private options: ChartOptions) {
    this.canvas = h("div", { class: "chart-canvas" });
    this.note = h("p", { class: "chart-note" });
    this.element = h("figure", { class: "chart", "data-chart": options.id, "data-points": 0, "data-last-step": 0 },
      h("figcaption", {}, options.title), this.canvas, this.note);
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(this.canvas);
    mounted.set(options.id, this);
    this.render();
  }

  /** Replace the series list (the sweep's member curves), keeping data of those still present. */
  setSpecs(series: LineSpec[]): void {
    this.options = { ...this.options, series };
    this.plot?.destroy();
    this.plot = null;
    this.render();
  }

  setYLog(yLog: boolean): void {
    if (Boolean(this.options.yLog) === yLog) return;
    this.options = { ...this.options, yLog };
    this.plot?.destroy();
    this.plot = null;
    this.render();
  }

  setThreshold(threshold: ChartOptions["threshold"]): void {
    this.options = { ...this.options, threshold };
    this.schedule();
  }

  setXMarks(xMarks: ChartOptions["xMarks"]): void {
    this.options = { ...this.options, xMarks };
    this.element.dataset.xMarks = (xMarks ?? []).map((m) => m.value).join(",");
    this.schedule();
  }

  setAxis(xLabel: string, categories: string[] | undefined, xLog: boolean, xTicks?: number[]): void {
    this.options = { ...this.options, xLabel, xCategories: categories, xLog, xTicks };
    this.plot?.destroy();
    this.plot = null;
    this.render();
  }

  /** Set the points of some series (others keep theirs). */
  set(series: Record<string, Point[]>, errors?: Record<string, Array<[number, number]>>): void {
    for (const [name, points] of Object.entries(series)) this.data[name] = points;
    for (const [name, pairs] of Object.entries(errors ?? {})) this.errors[name] = new Map(pairs);
    this.schedule();
  }

  get(name: string): Point[] {
    return this.data[name] ?? [];
  }

  snapshot(): ChartSnapshot {
    const names = this.options.series.map((s) => s.name);
    return {
      title: this.options.title,
      series: Object.fromEntries(names.map((n) => [n, this.get(n)])),
      errors: Object.fromEntries(Object.entries(this.errors).map(([n, m]) => [n, [...m.entries()]])),
      threshold: this.options.threshold?.value ?? null,
      xMarks: (this.options.xMarks ?? []).map((m) => m.value),
      xLog: Boolean(this.options.xLog),
      yLog: Boolean(this.options.yLog),
    };
  }

  destroy(): void {
    cancelAnimationFrame(this.frame);
    this.observer.disconnect();
    this.plot?.destroy();
    if (mounted.get(this.options.id) === this) mounted.delete(this.options.id);
  }

  // -- drawing -----------------------------------------------------------------------

  private schedule(): void {
    cancelAnimationFrame(this.frame);
    this.frame = requestAnimationFrame(() => this.render());
    // The exposed data must not wait for a frame (a hidden tab gets none).
    this.expose();
  }

  /** What tests and tools read off the figure: how many points it holds (which a full,
   *  downsampled re-read can lower) and the latest step it shows (which only grows). */
  private expose(): void {
    this.element.dataset.points = String(this.count());
    this.element.dataset.lastStep = String(this.lastStep());
  }

  private count(): number {
    return this.options.series.reduce((n, s) => n + this.get(s.name).length, 0);
  }

  private lastStep(): number {
    let last = 0;
    for (const s of this.options.series) for (const [x] of this.get(s.name)) last = Math.max(last, x);
    return last;
  }

  /** [xs, ys...]: the union of all steps; a series without a point at a step holds
   *  undefined there (spanned), while a non-finite point is null (a gap). */
  private aligned(): uPlot.AlignedData {
    const xs = new Set<number>();
    for (const s of this.options.series) for (const [x] of this.get(s.name)) xs.add(x);
    const sorted = [...xs].sort((a, b) => a - b);
    const index = new Map(sorted.map((x, i) => [x, i]));
    const columns = this.options.series.map((s) => {
      const column: Array<number | null | undefined> = new Array(sorted.length).fill(undefined);
      for (const [x, y] of this.get(s.name)) column[index.get(x)!] = y;
      return column;
    });
    return [sorted, ...columns] as unknown as uPlot.AlignedData;
  }

  private yExtent(): [number, number] | null {
    let lo = Infinity;
    let hi = -Infinity;
    const log = Boolean(this.options.yLog);
    for (const s of this.options.series) {
      const errs = this.errors[s.name];
      for (const [x, y] of this.get(s.name)) {
        if (y === null || (log && y <= 0)) continue;
        const e = log ? 0 : errs?.get(x) ?? 0;
        lo = Math.min(lo, y - e);
        hi = Math.max(hi, y + e);
      }
    }
    const t = this.options.threshold?.value;
    if (t !== undefined && t !== null) {
      lo = Math.min(lo, t);
      hi = Math.max(hi, t);
    }
    if (!Number.isFinite(lo)) return null;
    if (log) return [lo / 1.5, hi * 1.5];
    const pad = (hi - lo) * 0.06 || Math.abs(hi) * 0.1 || 1;
    return [lo - pad, hi + pad];
  }

  private resize(): void {
    if (this.plot) this.plot.setSize({ width: this.width(), height: this.options.height ?? 220 });
  }

  private width(): number {
    return Math.max(240, this.canvas.clientWidth || 600);
  }

  private render(): void {
    this.expose();
    const total = this.count();
    const nonfinite = this.options.series.reduce((n, s) => n + this.get(s.name).filter(([, y]) => y === null).length, 0);
    const notes: string[] = [];
    if (!total) notes.push(this.options.empty ?? "No points yet.");
    if (nonfinite) notes.push(`${nonfinite} non-finite value${nonfinite > 1 ? "s" : ""} (marked × at the top).`);
    this.note.textContent = notes.join(" ");
    const data = this.aligned();
    if (!this.plot) this.plot = new uPlot(this.uplotOptions(), data, this.canvas);
    else this.plot.setData(data);
  }

  private uplotOptions(): uPlot.Options {
    const o = this.options;
    const categories = o.xCategories;
    const series: uPlot.Series[] = [{ label: o.xLabel ?? "step", value: (_u, v) => (v == null ? "–" : categories ? categories[v] ?? String(v) : String(v)) }];
    for (const s of o.series) {
      series.push({
        label: s.label,
        stroke: s.color,
        width: s.pointsOnly ? 0 : s.width ?? 1.5,
        dash: s.dash,
        spanGaps: false,
        paths: s.pointsOnly ? () => null : undefined,
        points: s.pointsOnly
          ? { show: true, size: 7, fill: s.color, stroke: s.color, width: 1 }
          : s.dots
            ? { show: true, size: 5, fill: s.color, stroke: s.color }
            : { show: false },
        value: (_u, v) => (v == null ? "–" : formatTick(v)),
      });
    }
    const x: uPlot.Scale = categories
      ? { time: false, range: () => [-0.5, categories.length - 0.5] }
      : o.xLog
        ? { time: false, distr: 3, log: 2, ...(o.padX ? { range: (_u: uPlot, min: number, max: number) => paddedLog(min, max) } : {}) }
        : { time: false, ...(o.padX ? { range: (_u: uPlot, min: number, max: number) => padded(min, max) } : {}) };
    return {
      width: this.width(),
      height: o.height ?? 220,
      series,
      cursor: o.syncKey ? { sync: { key: o.syncKey } } : {},
      legend: { live: true },
      scales: {
        x,
        y: o.yLog
          ? { distr: 3, log: 10, range: (_u, min, max) => this.yExtent() ?? [min, max] }
          : { range: (_u, min, max) => this.yExtent() ?? [min, max] },
      },
      axes: [
        {
          label: o.xLabel ?? "step",
          stroke: "#444",
          grid: { stroke: "#e4e4e4" },
          ...(categories
            ? { splits: () => categories.map((_, i) => i), values: (_u: uPlot, ticks: number[]) => ticks.map((t) => categories[t] ?? "") }
            : o.xTicks
              ? { splits: () => o.xTicks!, values: (_u: uPlot, ticks: number[]) => ticks.map(formatTick) }
              : { values: (_u: uPlot, ticks: number[]) => ticks.map(formatTick) }),
        },
        // A log axis leaves some ticks unlabelled (null).
        { label: o.yLabel, stroke: "#444", grid: { stroke: "#e4e4e4" }, size: 60, values: (_u, ticks) => ticks.map((t) => (t == null ? "" : formatTick(t))) },
      ],
      hooks: { draw: [(u) => this.decorate(u)] },
    };
  }

  /** What uPlot does not draw itself: the threshold line, the x marks, error bars, non-finite marks. */
  private decorate(u: uPlot): void {
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const dpr = devicePixelRatio || 1;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    const t = this.options.threshold;
    if (t) {
      const y = u.valToPos(t.value, "y", true);
      referenceLine(ctx, dpr, [left, y, left + width, y], { color: "#d84315", width: 1.5, dash: [6, 4] },
        { text: t.label, x: left + width - 4 * dpr, y: y - 4 * dpr, color: "#d84315", size: 12, align: "right" });
    }
    for (const mark of this.options.xMarks ?? []) {
      const x = u.valToPos(mark.value, "x", true);
      referenceLine(ctx, dpr, [x, top, x, top + height], { color: "#757575", width: 1, dash: [3, 3] },
        { text: mark.label, x: x + 3 * dpr, y: top + 12 * dpr, color: "#555", size: 11, align: "left" });
    }
    this.options.series.forEach((s, i) => {
      const errs = this.errors[s.name];
      const show = u.series[i + 1]?.show !== false;
      if (!show) return;
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 1.5 * dpr;
      for (const [x, y] of this.get(s.name)) {
        const px = u.valToPos(x, "x", true);
        if (y === null) {
          const at = Math.min(Math.max(px, left + 6 * dpr), left + width - 6 * dpr); // inside the plot
          ctx.fillStyle = NONFINITE;
          ctx.font = `bold ${13 * dpr}px system-ui, sans-serif`;
          ctx.textAlign = "center";
          ctx.fillText("×", at, top + 12 * dpr);
          continue;
        }
        const e = errs?.get(x);
        if (!e) continue;
        const y0 = u.valToPos(y - e, "y", true);
        const y1 = u.valToPos(y + e, "y", true);
        const cap = 5 * dpr;
        ctx.beginPath();
        ctx.moveTo(px, y0);
        ctx.lineTo(px, y1);
        ctx.moveTo(px - cap, y0);
        ctx.lineTo(px + cap, y0);
        ctx.moveTo(px - cap, y1);
        ctx.lineTo(px + cap, y1);
        ctx.stroke();
      }
    });
    ctx.restore();
  }
}

/** A dashed reference line (the clip threshold, a rung) from (x0, y0) to (x1, y1) in canvas
 *  pixels, and its label; widths, dashes and font sizes in CSS pixels. */
function referenceLine(
  ctx: CanvasRenderingContext2D, dpr: number, [x0, y0, x1, y1]: [number, number, number, number],
  line: { color: string; width: number; dash: [number, number] },
  label: { text: string; x: number; y: number; color: string; size: number; align: CanvasTextAlign },
): void {
  ctx.strokeStyle = line.color;
  ctx.lineWidth = line.width * dpr;
  ctx.setLineDash(line.dash.map((d) => d * dpr));
  ctx.beginPath();
  ctx.moveTo(x0, y0);
  ctx.lineTo(x1, y1);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = label.color;
  ctx.font = `${label.size * dpr}px system-ui, sans-serif`;
  ctx.textAlign = label.align;
  ctx.fillText(label.text, label.x, label.y);
}

// uPlot asks for a range with min and max null while there is no data: give a default.
function padded(min: number | null, max: number | null): [number, number] {
  if (min === null || max === null || !Number.isFinite(min) || !Number.isFinite(max)) return [0, 1];
  const pad = (max - min) * 0.08 || Math.abs(max) * 0.1 || 1;
  return [min - pad, max + pad];
}

function paddedLog(min: number | null, max: number | null): [number, number] {
  if (min === null || max === null || !(min > 0) || !(max > 0)) return [1, 10];
  return [min / 1.5, max * 1.5];
}

export function formatTick(v: number): string {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e6 || a < 1e-3) return v.toExponential(1);
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  return String(Number(v.toPrecision(4)));
}

// Colours for values of a swept parameter (viridis-like, dark to bright; readable on white).
const STOPS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#c8b800"];

export function scaleColor(t: number): string {
  const clamped = Math.max(0, Math.min(1, Number.isFinite(t) ? t : 0));
  const pos = clamped * (STOPS.length - 1);
  const i = Math.min(Math.floor(pos), STOPS.length - 2);
  const f = pos - i;
  const a = hex(STOPS[i]);
  const b = hex(STOPS[i + 1]);
  const mix = a.map((c, k) => Math.round(c + (b[k] - c) * f));
  return `rgb(${mix[0]}, ${mix[1]}, ${mix[2]})`;
}

function hex(color: string): number[] {
  return [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
}

export const PALETTE = {
  train: "#1565c0",
  valid: "#ef6c00",
  before: "#6a1b9a",
  after: "#00897b",
  clipped: "#c62828",
  throughput: "#2e7d32",
};
