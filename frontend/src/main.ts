// The dashboard's entry point: a small History-API router over real URLs (/, /jobs/{id},
// /sweeps/{id}, /compare?jobs=a,b, /datasets), so links, the back button, reloads and deep
// links behave like any site.

import "uplot/dist/uPlot.min.css";
import "./style.css";
import { clearToken, getToken, UNAUTHORIZED } from "./api";
import { h, replace } from "./dom";
import { comparePage } from "./pages/compare";
import { datasetsPage } from "./pages/datasets";
import { jobPage } from "./pages/job";
import { jobsPage } from "./pages/jobs";
import { loginPage } from "./pages/login";
import type { Page } from "./pages/page";
import { sweepPage } from "./pages/sweep";

const routes: Array<[RegExp, Page, string[]]> = [
  [/^\/$/, jobsPage, []],
  [/^\/jobs\/([^/]+)\/?$/, jobPage, ["id"]],
  [/^\/sweeps\/([^/]+)\/?$/, sweepPage, ["id"]],
  [/^\/compare\/?$/, comparePage, []],
  [/^\/datasets\/?$/, datasetsPage, []],
];

const main = document.getElementById("main") as HTMLElement;
const account = document.getElementById("account") as HTMLElement;
let current: { controller: AbortController; disposers: Array<() => void> } | null = null;

function stop(): void {
  if (!current) return;
  current.controller.abort();
  for (const dispose of current.disposers) dispose();
  current = null;
}

export function navigate(to: string, options: { replace?: boolean } = {}): void {
  const url = new URL(to, location.origin);
  if (options.replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  render();
  window.scrollTo(0, 0);
}

function render(reason: string | null = null): void {
  stop();
  drawAccount();
  const url = new URL(location.href);
  if (!getToken()) {
    loginPage(main, reason, () => render());
    return;
  }
  const controller = new AbortController();
  const disposers: Array<() => void> = [];
  current = { controller, disposers };
  for (const [pattern, page, names] of routes) {
    const match = pattern.exec(url.pathname);
    if (!match) continue;
    const params = Object.fromEntries(names.map((n, i) => [n, decodeURIComponent(match[i + 1])]));
    page(main, { url, params, navigate, signal: controller.signal, onDispose: (fn) => disposers.push(fn) });
    focusHeading();
    return;
  }
  document.title = "Not found · unroll";
  replace(main, h("h1", { tabindex: -1 }, "Page not found"), h("p", {}, h("a", { href: "/" }, "Go to the jobs")));
  focusHeading();
}

/** After a navigation, move focus to the new page's heading (keyboard and screen readers
 *  start there, as after a full page load), without scrolling. */
function focusHeading(): void {
  if (document.activeElement && document.activeElement !== document.body && main.contains(document.activeElement)) return;
  (main.querySelector("h1") as HTMLElement | null)?.focus({ preventScroll: true });
}

function drawAccount(): void {
  if (!getToken()) {
    account.replaceChildren();
    return;
  }
  replace(account, h("button", {
    type: "button", class: "link", id: "sign-out",
    onclick: () => {
      clearToken();
      render();
    },
  }, "Sign out"));
}

// Same-origin links navigate inside the app (new tabs and downloads behave as usual).
document.addEventListener("click", (e) => {
  if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const link = (e.target as Element).closest("a");
  if (!link || link.target || link.hasAttribute("download")) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith("/v1/") || url.pathname === "/docs") return;
  e.preventDefault();
  if (url.href !== location.href) navigate(url.pathname + url.search);
});

window.addEventListener("popstate", () => render());
window.addEventListener(UNAUTHORIZED, () => {
  clearToken();
  render("The API did not accept the stored token (revoked or expired?): sign in again.");
});

render();
