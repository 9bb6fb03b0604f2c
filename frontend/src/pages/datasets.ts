// The datasets page: the project's uploaded datasets (GET /v1/datasets), newest first, with
// what a job config needs to name one (`data.dataset: <id>`) and how to upload another.

import { api, ApiError } from "../api";
import { bytes, errorBox, h, replace, time } from "../dom";
import type { Dataset } from "../types";
import type { Page } from "./page";

/** As many as the API lists at once (GET /v1/datasets?limit=, at most 1000). */
const LIMIT = 1000;

export const datasetsPage: Page = (root, { signal }) => {
  document.title = "Datasets · unroll";
  const body = h("div", { class: "table-wrap", id: "datasets" }, h("p", { class: "muted" }, "Loading datasets…"));
  replace(root, h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Datasets")), body);

  function draw(datasets: Dataset[]): void {
    if (!datasets.length) {
      replace(body, empty());
      return;
    }
    replace(body,
      h("table", { class: "compact" },
        h("caption", { class: "sr-only" }, "The project's datasets, newest first"),
        h("thead", {}, h("tr", {}, ...["Name", "Id (data.dataset)", "Size", "SHA-256", "Uploaded"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, ...datasets.map((d) => h("tr", { "data-dataset": d.id },
          h("th", { scope: "row" }, d.name),
          h("td", { class: "mono" }, d.id),
          h("td", { class: "num", "data-bytes": d.bytes }, bytes(d.bytes)),
          h("td", { class: "mono small", title: d.sha256 }, `${d.sha256.slice(0, 12)}…`),
          h("td", {}, time(d.created_at)))))),
      h("p", { class: "muted small" }, "A job trains on one with ", h("code", {}, "data: {kind: text, dataset: <id>}"), "."));
  }

  (async () => {
    try {
      const { datasets } = await api<{ datasets: Dataset[] }>("/v1/datasets", { query: { limit: LIMIT }, signal });
      draw(datasets);
    } catch (error) {
      if (signal.aborted || (error instanceof ApiError && error.status === 401)) return;
      replace(body, errorBox(`Could not load datasets: ${(error as Error).message}`));
    }
  })();
};

function empty(): HTMLElement {
  const origin = location.origin;
  return h("div", { class: "empty", "data-empty": "datasets" },
    h("h2", {}, "No datasets yet"),
    h("p", {}, "Upload a text or CSV file once and train on it by id. With the CLI:"),
    h("pre", { class: "code" }, `unroll dataset upload corpus.txt --url ${origin} --token "$UNROLL_TOKEN"`),
    h("p", {}, "or over HTTP:"),
    h("pre", { class: "code" },
      `curl -X POST "${origin}/v1/datasets?name=corpus.txt" \\
  -H "Authorization: Bearer $UNROLL_TOKEN" -H "Content-Type: application/octet-stream" \\
  --data-binary @corpus.txt`));
}
