// Small DOM and formatting helpers (no framework: pages build elements with `h`).

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | null | undefined | EventListener>;

/** h("a", {href: "/", class: "x", onclick: fn}, "text", child) */
export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: Child[]): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, ...children);
  return el;
}

export function append(parent: Node, ...children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    parent.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }
}

export function replace(parent: Element, ...children: Child[]): void {
  parent.replaceChildren();
  append(parent, ...children);
}

export function stateBadge(state: string, cancelRequested = false): HTMLElement {
  const label = cancelRequested && (state === "running" || state === "queued") ? `${state} (cancelling)` : state;
  return h("span", { class: `badge state-${state}`, "data-state": state }, label);
}

export function progressBar(progress: number, label: string): HTMLElement {
  const pct = Math.max(0, Math.min(1, progress || 0));
  return h("span", { class: "progress" },
    h("progress", { max: 1, value: pct, "aria-label": label }),
    h("span", { class: "progress-text" }, `${Math.round(pct * 100)}%`));
}

const numberFormat = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 4 });

export function num(value: unknown, digits?: number): string {
  if (value === null || value === undefined || value === "") return "–";
  if (typeof value !== "number") return String(value);
  if (!Number.isFinite(value)) return String(value);
  if (digits !== undefined) return value.toFixed(digits);
  if (value !== 0 && (Math.abs(value) >= 1e6 || Math.abs(value) < 1e-3)) return value.toExponential(2);
  return numberFormat.format(value);
}

export function bytes(value: number | null | undefined): string {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = value;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function duration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function parseTime(iso: string | null | undefined): number | null {
  if (!iso) return null;
  // The API's datetimes may lack a zone when the database is SQLite: they are UTC.
  const t = Date.parse(/[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : `${iso}Z`);
  return Number.isNaN(t) ? null : t;
}

export function age(iso: string | null | undefined, now = Date.now()): string {
  const t = parseTime(iso);
  return t === null ? "–" : `${duration((now - t) / 1000)} ago`;
}

export function time(iso: string | null | undefined): HTMLElement | string {
  const t = parseTime(iso);
  if (t === null) return "–";
  const date = new Date(t);
  return h("time", { datetime: date.toISOString(), title: date.toISOString() }, date.toLocaleString());
}

/** A definition list from [label, value] pairs (values may be elements). */
export function facts(pairs: Array<[string, Child]>): HTMLElement {
  const dl = h("dl", { class: "facts" });
  for (const [label, value] of pairs) {
    if (value === null || value === undefined || value === false) continue;
    append(dl, h("div", {}, h("dt", {}, label), h("dd", {}, value)));
  }
  return dl;
}

export function errorBox(message: string): HTMLElement {
  return h("p", { class: "error", role: "alert" }, message);
}

/** A polite live region the pages use to announce changes (state changes, actions). */
export function announce(message: string): void {
  const region = document.getElementById("announcer");
  if (region) region.textContent = message;
}
