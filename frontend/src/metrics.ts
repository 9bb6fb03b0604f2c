// A job's metric series as the page holds them: one downsampled read (max_points, which keeps
// each bucket's extremes) and then only the new tail, merged in; a full read again when the
// tail has grown long, and at the end, so a finished job's chart holds exactly what
// GET /v1/jobs/{id}/metrics?max_points=N returns.

import { api } from "./api";
import type { Point, Series } from "./types";

/** The resolution of the charts: about one point per pixel of a laptop-width chart. */
export const MAX_POINTS = 500;

export class MetricsFeed {
  data: Series = {};
  private last = -1;
  private needsFull = true;
  private busy: Promise<boolean> | null = null;

  constructor(
    readonly jobId: string,
    readonly names: string[],
    readonly maxPoints = MAX_POINTS,
  ) {}

  /** Read what is new (or everything, with `full`). Resolves true when the data changed. */
  refresh(signal: AbortSignal, full = false): Promise<boolean> {
    if (full) this.needsFull = true;
    if (this.busy) return this.busy.then(() => (this.needsFull ? this.refresh(signal) : false));
    this.busy = this.read(signal).finally(() => (this.busy = null));
    return this.busy;
  }

  private async read(signal: AbortSignal): Promise<boolean> {
    const path = `/v1/jobs/${encodeURIComponent(this.jobId)}/metrics`;
    if (this.needsFull || this.last < 0) {
      this.needsFull = false;
      const { series } = await api<{ series: Series }>(path, { query: { names: this.names, max_points: this.maxPoints }, signal });
      this.data = Object.fromEntries(this.names.map((n) => [n, series[n] ?? []]));
      this.last = lastStep(this.data);
      return true;
    }
    // Points of one step may arrive in two batches: re-read the last step known.
    const since = this.last;
    const { series } = await api<{ series: Series }>(path, {
      query: { names: this.names, since_step: since, max_points: this.maxPoints },
      signal,
    });
    let changed = false;
    for (const name of this.names) {
      const fresh = series[name] ?? [];
      const kept = (this.data[name] ?? []).filter(([step]) => step < since);
      const before = this.data[name] ?? [];
      const merged = kept.concat(fresh);
      if (merged.length !== before.length || !samePoints(merged.slice(kept.length), before.slice(kept.length))) changed = true;
      this.data[name] = merged;
      if (merged.length > 2 * this.maxPoints) this.needsFull = true;
    }
    this.last = Math.max(this.last, lastStep(this.data));
    return changed;
  }
}

function lastStep(data: Series): number {
  let last = -1;
  for (const points of Object.values(data)) if (points.length) last = Math.max(last, points[points.length - 1][0]);
  return last;
}

function samePoints(a: Point[], b: Point[]): boolean {
  return a.length === b.length && a.every(([s, v], i) => s === b[i][0] && v === b[i][1]);
}
