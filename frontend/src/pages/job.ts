// The job page: what the job is (config, state history, attempts), how it is learning
// (live charts of loss, validation, gradient norm before/after clipping, throughput),
// its log tail and checkpoints, the cancel and retry buttons, and its model at work
// (generate for text, the validation forecast for time series: ./model.ts).
//
// Live: the event stream (fetch + SSE, resumed with Last-Event-ID when it drops or the
// server ends it) says when something changed; the page then reads the new metric points,
// log lines and checkpoints from the API (the database is the record, and holds what came
// before the page opened), throttled to about once a second.

import { api, ApiError, download, followJob, isFinal, sleep, type StreamEvent } from "../api";
import { Chart, PALETTE, type LineSpec } from "../charts";
import { announce, bytes, duration, errorBox, facts, h, num, parseTime, progressBar, replace, stateBadge, time } from "../dom";
import { MAX_POINTS, MetricsFeed } from "../metrics";
import type { Checkpoint, Job, LogLine, Point } from "../types";
import { modelPanel, type ModelPanel } from "./model";
import type { Page } from "./page";

const LOG_TAIL = 300;
const THROTTLE_MS = 1000;
const FALLBACK_POLL_MS = 5000;
/** The charts of each tbptt.mode that chooses its own truncation (trainer/truncation.py). */
const TRUNCATION: Record<string, Array<{ id: string; title: string; yLabel: string; series: string[] }>> = {
  adaptive: [
    { id: "truncation", title: "k2 chosen", yLabel: "steps", series: ["train/k2"] },
    { id: "decay", title: "Measured gradient decay and estimated bias", yLabel: "", series: ["train/decay_rate", "train/bias"] },
  ],
  unbiased: [{ id: "truncation", title: "Truncation drawn and its largest weight", yLabel: "", series: ["train/truncation_length", "train/reweight_max"] }],
};

/** The validation metric of each task (SPEC §2, §3). */
export function taskMetric(config: Record<string, any>): string {
  const kind = config?.data?.kind;
  if (kind === "text") return "valid/ppl";
  if (kind === "adding" || kind === "timeseries") return "valid/mse";
  return "valid/accuracy";
}

export const jobPage: Page = (root, { params, url, signal, onDispose }) => {
  const jobId = params.id;
  // The charts' resolution (points per series); ?max_points=N in the URL overrides it.
  const asked = Number(url.searchParams.get("max_points"));
  const maxPoints = Number.isInteger(asked) && asked >= 10 ? Math.min(asked, 10_000) : MAX_POINTS;
  let job: Job | null = null;
  let feed: MetricsFeed | null = null;
  const charts: Chart[] = [];
  onDispose(() => charts.forEach((c) => c.destroy()));

  const title = h("h1", { tabindex: -1 }, jobId);
  const badge = h("span", { class: "head-badge" });
  const cancel = h("button", { type: "button", class: "danger", id: "cancel-job", disabled: true }, "Cancel");
  const retry = h("button", { type: "button", id: "retry-job", disabled: true }, "Retry");
  const actionStatus = h("span", { class: "action-status", role: "status" });
  const overview = h("div", { class: "overview" });
  const problem = h("div");
  const chartGrid = h("div", { class: "charts", "data-max-points": maxPoints });
  const history = h("div", { class: "history" });
  const checkpoints = h("div", { class: "checkpoints" }, h("p", { class: "muted" }, "Loading…"));
  const logBox = h("pre", { class: "log", tabindex: 0, "aria-label": "Log tail" }, "");
  const config = h("pre", { class: "code config" });
  const modelSlot = h("div", { class: "model-slot" });
  let model: ModelPanel | null = null;
  onDispose(() => model?.destroy());

  replace(root,
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "/" }, "Jobs"), " › ", h("span", { class: "mono" }, jobId)),
    h("div", { class: "page-head" },
      h("div", { class: "title" }, title, badge),
      h("div", { class: "actions" }, cancel, retry, actionStatus)),
    problem,
    overview,
    h("section", { "aria-labelledby": "charts-h" }, h("h2", { id: "charts-h" }, "Training curves"), chartGrid),
    modelSlot,
    h("div", { class: "two" },
      h("section", { "aria-labelledby": "history-h" }, h("h2", { id: "history-h" }, "State history and attempts"), history),
      h("section", { "aria-labelledby": "ckpt-h" }, h("h2", { id: "ckpt-h" }, "Checkpoints"), checkpoints)),
    h("section", { "aria-labelledby": "log-h" }, h("h2", { id: "log-h" }, "Log tail"), logBox),
    h("section", { "aria-labelledby": "config-h" }, h("h2", { id: "config-h" }, "Configuration"), config));

  // -- drawing ---------------------------------------------------------------------------

  function drawHead(j: Job): void {
    document.title = `${j.name || j.id} · unroll`;
    title.textContent = j.name || j.id;
    replace(badge, stateBadge(j.state, j.cancel_requested));
    badge.dataset.state = j.state;
    cancel.disabled = isFinal(j.state) || j.cancel_requested;
    retry.disabled = !(j.state === "failed" || j.state === "cancelled");
    const started = parseTime(j.started_at);
    const finished = parseTime(j.finished_at);
    const elapsed = started === null ? null : ((finished ?? Date.now()) - started) / 1000;
    replace(overview,
      h("div", { class: "overview-progress" }, progressBar(j.progress, "training progress"),
        h("span", { class: "muted" }, ` step ${j.step}${j.max_steps ? ` of ${j.max_steps}` : ""}`)),
      facts([
        ["Job id", h("span", { class: "mono" }, j.id)],
        ["Attempt", `${j.attempt} of ${j.max_attempts}`],
        ["Worker", j.worker ?? "–"],
        ["Created", time(j.created_at)],
        ["Started", time(j.started_at)],
        ["Finished", j.finished_at ? time(j.finished_at) : null],
        ["Running for", elapsed !== null ? duration(elapsed) : null],
        ["Sweep", j.sweep_id ? h("a", { href: `/sweeps/${encodeURIComponent(j.sweep_id)}`, class: "mono" }, j.sweep_id) : null],
        ["Tags", j.tags.length ? h("span", {}, ...j.tags.map((t) => h("span", { class: "tag" }, t))) : null],
        ["Priority", String(j.priority)],
        ["Final loss", j.summary ? num(j.summary.final_train_loss) : null],
        ["Tokens/s", j.summary ? num(j.summary.tokens_per_s) : null],
      ]));
    replace(problem,
      j.error ? errorBox(`Failed: ${j.error}`) : null,
      j.state === "queued" && j.pending_reason ? h("p", { class: "notice" }, `Waiting: ${j.pending_reason}`) : null);
    drawHistory(j);
  }

  function drawHistory(j: Job): void {
    const events: Array<[string | null, HTMLElement | string]> = [[j.created_at, "submitted: queued"]];
    for (const a of j.attempts ?? []) {
      events.push([a.started_at, `attempt ${a.number} started${a.worker ? ` on ${a.worker}` : ""}: running`]);
      if (a.ended_at) events.push([a.ended_at, `attempt ${a.number} ended: ${a.outcome ?? "?"}${a.error ? ` (${a.error})` : ""}${a.outcome === "lost" ? ", back to queued" : ""}`]);
    }
    if (j.cancel_requested && !isFinal(j.state)) events.push([null, "cancel requested"]);
    if (j.finished_at) events.push([j.finished_at, `finished: ${j.state}`]);
    const attempts = j.attempts ?? [];
    replace(history,
      h("ol", { class: "timeline" }, ...events.map(([at, what]) => h("li", {}, h("span", { class: "when" }, time(at)), " ", what))),
      attempts.length
        ? h("table", { class: "compact" },
          h("thead", {}, h("tr", {}, ...["#", "Worker", "Started", "Ended", "Outcome"].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, ...attempts.map((a) => h("tr", {},
            h("td", {}, String(a.number)), h("td", { class: "mono small" }, a.worker ?? "–"), h("td", {}, time(a.started_at)),
            h("td", {}, time(a.ended_at)), h("td", {}, a.outcome ?? "running", a.error ? h("div", { class: "muted small" }, a.error) : null)))))
        : h("p", { class: "muted" }, "No attempt yet."));
  }

  // -- charts ----------------------------------------------------------------------------

  let lossChart: Chart, validChart: Chart, normChart: Chart, speedChart: Chart;
  const truncationCharts: Array<[Chart, string[]]> = [];
  const truncationSeries: string[] = [];
  let metric = "valid/accuracy";
  let threshold: number | null = null;

  function buildCharts(j: Job): void {
    metric = taskMetric(j.config);
    const clip = j.config?.clip ?? {};
    threshold = (clip.mode ?? "norm") === "norm" && !clip.per_parameter ? Number(clip.max_norm ?? 1.0) : null;
    const normSeries: LineSpec[] = [
      { name: "train/grad_norm", label: "before clipping", color: PALETTE.before },
      { name: "train/grad_norm_clipped", label: "after clipping", color: PALETTE.after, dash: [4, 3] },
      { name: "clipped", label: "clipped step", color: PALETTE.clipped, pointsOnly: true },
    ];
    lossChart = new Chart({ id: "loss", title: "Loss", syncKey: jobId, yLabel: "loss", series: [
      { name: "train/loss", label: "train/loss", color: PALETTE.train },
      { name: "valid/loss", label: "valid/loss", color: PALETTE.valid, dots: true, width: 2 },
    ] });
    validChart = new Chart({ id: "valid", title: `Validation: ${metric}`, syncKey: jobId, yLabel: metric.split("/")[1],
      series: [{ name: metric, label: metric, color: PALETTE.valid, dots: true, width: 2 }], empty: "No evaluation yet." });
    normChart = new Chart({ id: "grad_norm", title: "Gradient norm, before and after clipping", syncKey: jobId, yLabel: "norm",
      series: normSeries, threshold: threshold !== null ? { value: threshold, label: `clip.max_norm = ${threshold}` } : null });
    speedChart = new Chart({ id: "tokens_per_s", title: "Throughput", syncKey: jobId, yLabel: "tokens/s",
      series: [{ name: "train/tokens_per_s", label: "train/tokens_per_s", color: PALETTE.throughput }] });
    charts.push(lossChart, validChart, normChart, speedChart);
    // tbptt.mode adaptive / unbiased: the truncation it chose (docs/tbptt.md)
    for (const spec of TRUNCATION[j.config?.tbptt?.mode] ?? []) {
      const chart = new Chart({ id: spec.id, title: spec.title, syncKey: jobId, yLabel: spec.yLabel,
        series: spec.series.map((name, i) => ({ name, label: name, color: i ? PALETTE.after : PALETTE.before })) });
      truncationCharts.push([chart, spec.series]);
      truncationSeries.push(...spec.series);
      charts.push(chart);
    }
    replace(chartGrid, ...charts.map((c) => c.element));
    feed = new MetricsFeed(jobId, ["train/loss", "valid/loss", metric, "train/grad_norm", "train/grad_norm_clipped", "train/clipped", "train/tokens_per_s", ...truncationSeries], maxPoints);
  }

  function drawCharts(): void {
    if (!feed) return;
    const d = feed.data;
    lossChart.set({ "train/loss": d["train/loss"] ?? [], "valid/loss": d["valid/loss"] ?? [] });
    validChart.set({ [metric]: d[metric] ?? [] });
    normChart.set({
      "train/grad_norm": d["train/grad_norm"] ?? [],
      "train/grad_norm_clipped": d["train/grad_norm_clipped"] ?? [],
      clipped: clippedMarks(d["train/clipped"] ?? [], d["train/grad_norm"] ?? [], d["train/grad_norm_clipped"] ?? [], threshold),
    });
    speedChart.set({ "train/tokens_per_s": d["train/tokens_per_s"] ?? [] });
    for (const [chart, names] of truncationCharts) chart.set(Object.fromEntries(names.map((name) => [name, d[name] ?? []])));
  }

  // -- reading ---------------------------------------------------------------------------

  async function loadJob(): Promise<void> {
    const fresh = await api<Job>(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal });
    const first = job === null;
    job = fresh;
    if (first) {
      buildCharts(fresh);
      config.textContent = JSON.stringify(fresh.config, null, 2);
      model = modelPanel(fresh, signal);
      if (model) replace(modelSlot, model.element);
    }
    drawHead(fresh);
  }

  async function loadMetrics(full = false): Promise<void> {
    if (feed && (await feed.refresh(signal, full))) drawCharts();
  }

  let logAfter = 0;
  const logLines: string[] = [];
  let logRead: Promise<void> | null = null;
  /** Read the lines after the last one shown; one read at a time (two at once would both
   *  start from the same `after` and show the new lines twice). */
  function loadLogs(): Promise<void> {
    const previous = logRead;
    const next = (async () => {
      if (previous) await previous;
      await readLogs();
    })();
    // The queue's own promise never rejects (the caller gets the error from `next`).
    const queued: Promise<void> = next.then(() => undefined, () => undefined).then(() => {
      if (logRead === queued) logRead = null;
    });
    logRead = queued;
    return next;
  }

  async function readLogs(): Promise<void> {
    for (let page = 0; page < 20; page++) {
      const result = await api<{ lines: LogLine[]; next_after: number }>(`/v1/jobs/${encodeURIComponent(jobId)}/logs`, {
        query: { after: logAfter, limit: 5000 },
        signal,
      });
      for (const l of result.lines) {
        if (l.id <= logAfter) continue;
        logAfter = l.id;
        logLines.push(`${l.attempt > 1 ? `[attempt ${l.attempt}] ` : ""}${l.line}`);
      }
      if (result.lines.length < 5000) break;
    }
    if (logLines.length > LOG_TAIL) logLines.splice(0, logLines.length - LOG_TAIL);
    const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
    logBox.textContent = logLines.length ? logLines.join("\n") : "No log lines yet.";
    if (atBottom) logBox.scrollTop = logBox.scrollHeight;
  }

  async function loadCheckpoints(): Promise<void> {
    const { checkpoints: list } = await api<{ checkpoints: Checkpoint[] }>(`/v1/jobs/${encodeURIComponent(jobId)}/checkpoints`, { signal });
    if (!list.length) {
      replace(checkpoints, h("p", { class: "muted" }, "No checkpoint yet."));
      return;
    }
    replace(checkpoints, h("table", { class: "compact" },
      h("thead", {}, h("tr", {}, ...["Step", "Attempt", "Size", "Written", ""].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, ...list.map((c) => h("tr", {},
        h("td", { class: "num" }, String(c.step)), h("td", { class: "num" }, String(c.attempt)),
        h("td", { class: "num" }, bytes(c.bytes)), h("td", {}, time(c.created_at)),
        h("td", {}, h("button", { type: "button", class: "link", onclick: () => void save(c) }, `Download step ${c.step}`)))))));
  }

  async function save(c: Checkpoint): Promise<void> {
    try {
      await download(c.url, `${jobId}-step-${c.step}.pt`);
    } catch (error) {
      actionStatus.textContent = `Download failed: ${(error as Error).message}`;
    }
  }

  // Refreshes requested by events, at most one a second; the last one always runs.
  let pending = false;
  let lastRefresh = 0;
  let checkpointsAt = 0;
  async function refreshSoon(): Promise<void> {
    if (pending) return;
    pending = true;
    await sleep(Math.max(0, lastRefresh + THROTTLE_MS - Date.now()), signal);
    pending = false;
    // A finished job's page holds what finalRefresh read (the full, downsampled series): a
    // tail read after it would add back a raw last point that the downsampling dropped.
    if (signal.aborted || (job && isFinal(job.state))) return;
    lastRefresh = Date.now();
    const work = [loadMetrics(), loadLogs()];
    if (Date.now() - checkpointsAt > 5000) {
      checkpointsAt = Date.now();
      work.push(loadCheckpoints());
    }
    await Promise.allSettled(work);
  }

  async function finalRefresh(): Promise<void> {
    await Promise.allSettled([loadJob(), loadMetrics(true), loadLogs(), loadCheckpoints()]);
    model?.refresh(); // its model artifact now
  }

  let eventsSeen = 0;
  function onEvent(e: StreamEvent): void {
    const data = e.data as Record<string, any>;
    chartGrid.dataset.events = String(++eventsSeen); // how many live events arrived (tests read it)
    if (!job) return;
    if (e.event === "state") {
      if (data.snapshot) {
        const { type: _t, job_id: _j, snapshot: _s, ts: _ts, ...whole } = data;
        job = { ...job, ...(whole as Partial<Job>) };
        drawHead(job);
      } else {
        job = { ...job, state: data.state ?? job.state, attempt: data.attempt ?? job.attempt, error: data.error ?? job.error,
          cancel_requested: data.cancel_requested ?? job.cancel_requested };
        drawHead(job);
        announce(`Job is ${job.state}`);
        void loadJob().catch(() => undefined); // attempts, timestamps
      }
      if (isFinal(job.state)) void finalRefresh();
      else void refreshSoon();
    } else if (e.event === "progress") {
      job = { ...job, step: data.step ?? job.step, progress: data.progress ?? job.progress, state: job.state === "queued" ? "running" : job.state };
      drawHead(job);
      void refreshSoon();
    } else if (e.event === "metrics" || e.event === "log") {
      void refreshSoon();
    }
  }

  async function follow(): Promise<void> {
    try {
      await followJob(jobId, onEvent, signal);
    } catch (error) {
      if (!signal.aborted) actionStatus.textContent = `Live updates stopped: ${(error as Error).message}`;
    }
    if (!signal.aborted) await finalRefresh();
  }

  // Without events (Redis away) the page still moves: a slow poll while the job is live.
  async function fallbackPoll(): Promise<void> {
    while (!signal.aborted) {
      await sleep(FALLBACK_POLL_MS, signal);
      if (signal.aborted || !job || isFinal(job.state)) continue;
      if (Date.now() - lastRefresh > FALLBACK_POLL_MS) {
        await Promise.allSettled([loadJob(), refreshSoon()]);
      }
    }
  }

  // -- actions ---------------------------------------------------------------------------

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    actionStatus.textContent = "Cancelling…";
    try {
      job = await api<Job>(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", signal });
      drawHead(job);
      actionStatus.textContent = job.state === "cancelled" ? "Cancelled." : "Cancel requested: the job stops within a few seconds.";
      if (isFinal(job.state)) void finalRefresh();
    } catch (error) {
      actionStatus.textContent = `Cancel failed: ${(error as Error).message}`;
      if (job) drawHead(job);
    }
  });

  retry.addEventListener("click", async () => {
    retry.disabled = true;
    actionStatus.textContent = "Requeueing…";
    try {
      job = await api<Job>(`/v1/jobs/${encodeURIComponent(jobId)}/retry`, { method: "POST", signal });
      drawHead(job);
      actionStatus.textContent = "Requeued: it resumes from its last checkpoint.";
      void follow();
    } catch (error) {
      actionStatus.textContent = `Retry failed: ${(error as Error).message}`;
      if (job) drawHead(job);
    }
  });

  // -- start -----------------------------------------------------------------------------

  (async () => {
    try {
      await loadJob();
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status === 404) {
        document.title = "Not found · unroll";
        replace(root, h("h1", { tabindex: -1 }, "Job not found"),
          h("p", {}, `There is no job ${jobId} in this project. `, h("a", { href: "/" }, "Back to the jobs")));
      } else if (!(error instanceof ApiError && error.status === 401)) {
        replace(problem, errorBox(`Could not load the job: ${(error as Error).message}`));
      }
      return;
    }
    await Promise.allSettled([loadMetrics(true), loadLogs(), loadCheckpoints()]);
    void fallbackPoll();
    const loaded = job as Job | null; // set by loadJob (TypeScript does not see through the closure)
    if (loaded && !isFinal(loaded.state)) void follow();
  })();
};

/** Where the clip threshold was hit (train/clipped = 1), placed on the pre-clip norm of that
 *  step; with downsampled data that step may lack a norm point: then on the threshold line
 *  (or the clipped norm, for modes without one). */
export function clippedMarks(clipped: Point[], before: Point[], after: Point[], threshold: number | null): Point[] {
  const pre = new Map(before);
  const post = new Map(after);
  const marks: Point[] = [];
  for (const [step, flag] of clipped) {
    if (flag !== 1) continue;
    const y = pre.has(step) ? pre.get(step)! : threshold ?? post.get(step);
    if (y !== undefined) marks.push([step, y]);
  }
  return marks;
}
