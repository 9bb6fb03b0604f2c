// The jobs page: a live list (polled), filtered by state, tag and sweep; the filters live
// in the URL (?state=&tag=&sweep=) so back/forward and links keep them. Ticked jobs (of any
// sweep and state) open side by side on the compare page.

import { api, ApiError, sleep } from "../api";
import { age, errorBox, h, num, progressBar, replace, stateBadge } from "../dom";
import type { Job, JobList } from "../types";
import { compareUrl, MAX_COMPARE_JOBS } from "./compare";
import type { Page } from "./page";

const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];
const POLL_MS = 2000;
const PAGE = 50;

export const jobsPage: Page = (root, { url, navigate, signal }) => {
  const params = url.searchParams;
  const filters = { state: params.get("state") ?? "", tag: params.get("tag") ?? "", sweep: params.get("sweep") ?? "" };
  const filtered = Boolean(filters.state || filters.tag || filters.sweep);
  document.title = "Jobs · unroll";

  const state = h("select", { id: "filter-state", name: "state" },
    h("option", { value: "" }, "any state"),
    ...STATES.map((s) => h("option", { value: s, selected: s === filters.state }, s)));
  const tag = h("input", { id: "filter-tag", name: "tag", type: "search", value: filters.tag, placeholder: "e.g. demo", autocomplete: "off" });
  const sweep = h("input", { id: "filter-sweep", name: "sweep", type: "search", value: filters.sweep, placeholder: "swp_…", autocomplete: "off" });
  const apply = () => {
    const next = new URLSearchParams();
    if (state.value) next.set("state", state.value);
    if (tag.value.trim()) next.set("tag", tag.value.trim());
    if (sweep.value.trim()) next.set("sweep", sweep.value.trim());
    const query = next.toString();
    const focused = document.activeElement?.id;
    navigate(query ? `/?${query}` : "/");
    if (focused) document.getElementById(focused)?.focus(); // the control the user was on
  };
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter jobs" },
    h("label", { for: "filter-state" }, "State"), state,
    h("label", { for: "filter-tag" }, "Tag"), tag,
    h("label", { for: "filter-sweep" }, "Sweep"), sweep,
    h("button", { type: "submit" }, "Apply"),
    filtered ? h("a", { href: "/", class: "clear" }, "Clear filters") : null);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    apply();
  });
  state.addEventListener("change", apply);

  const status = h("p", { class: "status", "aria-live": "polite" });
  const body = h("div", { class: "jobs-body" }, h("p", { class: "muted" }, "Loading jobs…"));
  // Kept across polls and filters: the rows are redrawn, the selection is not.
  const selected = new Set<string>();
  const compare = h("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected");
  compare.addEventListener("click", () => navigate(compareUrl([...selected])));
  replace(root,
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Jobs"), h("div", { class: "actions" }, compare)),
    form, status, body);

  function select(id: string, on: boolean): void {
    if (on) selected.add(id);
    else selected.delete(id);
    compare.textContent = selected.size ? `Compare selected (${selected.size})` : "Compare selected";
    compare.disabled = selected.size < 2;
    draw();
  }

  let jobs: Job[] = [];
  let cursor: string | null = null;
  let limit = PAGE;
  // The latest loss and throughput of running jobs (the list carries no metrics).
  const live = new Map<string, Job>();

  async function load(): Promise<void> {
    const page = await api<JobList>("/v1/jobs", {
      query: { state: filters.state, tag: filters.tag, sweep_id: filters.sweep, limit },
      signal,
    });
    jobs = page.jobs;
    cursor = page.next_cursor;
    const running = jobs.filter((j) => j.state === "running").slice(0, 20);
    await Promise.all(running.map(async (j) => {
      try {
        live.set(j.id, await api<Job>(`/v1/jobs/${encodeURIComponent(j.id)}`, { signal }));
      } catch {
        // it may have just finished or gone: the next poll shows it
      }
    }));
    draw();
  }

  function draw(): void {
    if (!jobs.length) {
      replace(body, filtered ? noMatch() : emptyState());
      return;
    }
    const now = Date.now();
    const focused = (document.activeElement as HTMLElement | null)?.dataset?.select;
    const table = h("table", { class: "jobs" },
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, h("span", { class: "sr-only" }, "Compare")),
        ...["Job", "State", "Progress", "Loss", "Tokens/s", "Attempt", "Age", "Sweep"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, ...jobs.map((j) => row(j, now))));
    const more = cursor
      ? h("button", { type: "button", class: "more", onclick: () => { limit += PAGE; void refresh(); } }, "Load more")
      : null;
    replace(body, h("div", { class: "table-wrap" }, table), more);
    // The redraw replaced the box the keyboard was on: give focus to its successor.
    if (focused) (body.querySelector(`[data-select="${CSS.escape(focused)}"]`) as HTMLElement | null)?.focus();
  }

  function checkbox(j: Job): HTMLElement {
    const on = selected.has(j.id);
    const box = h("input", {
      type: "checkbox", "data-select": j.id, checked: on, "aria-label": `Compare ${j.name || j.id}`,
      // A comparison holds at most MAX_COMPARE_JOBS jobs.
      disabled: !on && selected.size >= MAX_COMPARE_JOBS,
    });
    box.addEventListener("change", () => select(j.id, box.checked));
    return box;
  }

  function row(j: Job, now: number): HTMLElement {
    const detail = live.get(j.id);
    const loss = detail?.metrics?.["train/loss"]?.value ?? j.summary?.final_train_loss ?? null;
    const tps = detail?.metrics?.["train/tokens_per_s"]?.value ?? j.summary?.tokens_per_s ?? null;
    return h("tr", { "data-job": j.id, "data-state": j.state },
      h("td", {}, checkbox(j)),
      h("th", { scope: "row" }, h("a", { href: `/jobs/${encodeURIComponent(j.id)}` }, j.name || j.id),
        j.name ? h("div", { class: "muted mono small" }, j.id) : null,
        j.tags.length ? h("div", { class: "tags" }, ...j.tags.map((t) => h("span", { class: "tag" }, t))) : null),
      h("td", {}, stateBadge(j.state, j.cancel_requested), j.pending_reason && j.state === "queued" ? h("div", { class: "muted small" }, j.pending_reason) : null),
      h("td", {}, progressBar(j.progress, `progress of ${j.name || j.id}`), h("div", { class: "muted small" }, `${j.step}${j.max_steps ? ` / ${j.max_steps}` : ""} steps`)),
      h("td", { class: "num" }, num(loss)),
      h("td", { class: "num" }, num(tps)),
      h("td", { class: "num" }, `${j.attempt} / ${j.max_attempts}`),
      h("td", {}, age(j.created_at, now)),
      h("td", {}, j.sweep_id ? h("a", { href: `/sweeps/${encodeURIComponent(j.sweep_id)}`, class: "mono small" }, j.sweep_id) : "–"));
  }

  async function refresh(): Promise<void> {
    try {
      await load();
      status.textContent = "";
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status === 401) return;
      status.replaceChildren(errorBox(`Could not load jobs: ${(error as Error).message}`));
    }
  }

  (async () => {
    while (!signal.aborted) {
      await refresh();
      await sleep(document.hidden ? POLL_MS * 5 : POLL_MS, signal);
    }
  })();
};

function noMatch(): HTMLElement {
  return h("div", { class: "empty" }, h("h2", {}, "No jobs match these filters"), h("p", {}, h("a", { href: "/" }, "Show all jobs")));
}

export function emptyState(): HTMLElement {
  const origin = location.origin;
  return h("div", { class: "empty", "data-empty": "jobs" },
    h("h2", {}, "No jobs yet"),
    h("p", {}, "Submit a first training job and it shows up here, live. With the CLI:"),
    h("pre", { class: "code" },
      `cat > job.yaml <<'EOF'
name: first-job
model: {cell: lstm, hidden_size: 64}
data: {kind: recall, vocab: 4, lag: 8, length: 20000}
tbptt: {k1: 16}
train: {max_steps: 500, eval_every: 100}
EOF
unroll submit job.yaml --url ${origin} --token "$UNROLL_TOKEN"`),
    h("p", {}, "or over HTTP:"),
    h("pre", { class: "code" },
      `curl -X POST ${origin}/v1/jobs \\
  -H "Authorization: Bearer $UNROLL_TOKEN" -H "Content-Type: application/json" \\
  -d '{"model": {"cell": "lstm"}, "data": {"kind": "recall"}, "train": {"max_steps": 500}}'`),
    h("p", {}, "A sweep over truncation lengths: ", h("code", {}, "unroll sweep job.yaml --grid tbptt.k1=4,16,64 --seeds 3"), ". The API is described at ", h("a", { href: "/docs" }, "/docs"), "."));
}
