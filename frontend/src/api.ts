// Talking to the API: the token (kept in localStorage, sent only as a Bearer header, never
// in a URL), JSON requests with the API's error shape, authenticated downloads, and
// Server-Sent Events read with fetch() (EventSource cannot send an Authorization header).

const TOKEN_KEY = "unroll.token";

export function getToken(): string | null {
  try {
    return localStorage.getItem(TOKEN_KEY);
  } catch {
    return null; // storage disabled: the user signs in again on each load
  }
}

export function setToken(token: string): void {
  localStorage.setItem(TOKEN_KEY, token);
}

export function clearToken(): void {
  localStorage.removeItem(TOKEN_KEY);
}

/** An error answer of the API: `{"error": {"code", "message", "field"?}}`. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly field?: string,
  ) {
    super(message);
  }
}

/** Fired on window when the API refuses the token, so the app can ask for a new one. */
export const UNAUTHORIZED = "unroll:unauthorized";

type Query = Record<string, string | number | undefined | null | string[]>;

export function withQuery(path: string, query?: Query): string {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value === undefined || value === null || value === "") continue;
    params.set(key, Array.isArray(value) ? value.join(",") : String(value));
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

function headers(extra?: Record<string, string>, token = getToken()): Record<string, string> {
  return { Accept: "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}), ...extra };
}

/** The API's error; a 401 on the stored token also tells the app (`notify`). */
async function failure(response: Response, notify = true): Promise<ApiError> {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`;
  let field: string | undefined;
  try {
    const body = await response.json();
    if (body?.error) ({ code, message, field } = body.error);
  } catch {
    // not JSON (a proxy's page): keep the status line
  }
  if (response.status === 401 && notify) window.dispatchEvent(new CustomEvent(UNAUTHORIZED, { detail: message }));
  return new ApiError(response.status, code, message, field);
}

export interface RequestOptions {
  method?: string;
  query?: Query;
  body?: unknown;
  signal?: AbortSignal;
  token?: string;
}

export async function api<T>(path: string, options: RequestOptions = {}): Promise<T> {
  const init: RequestInit = {
    method: options.method ?? "GET",
    headers: headers(options.body !== undefined ? { "Content-Type": "application/json" } : undefined, options.token ?? getToken()),
    signal: options.signal,
    cache: "no-store",
  };
  if (options.body !== undefined) init.body = JSON.stringify(options.body);
  const response = await fetch(withQuery(path, options.query), init);
  if (!response.ok) throw await failure(response, options.token === undefined);
  return (await response.json()) as T;
}

/** Download an authenticated file (a checkpoint) and hand it to the browser as `filename`. */
export async function download(path: string, filename: string): Promise<void> {
  const response = await fetch(path, { headers: headers({ Accept: "application/octet-stream" }) });
  if (!response.ok) throw await failure(response);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export interface StreamEvent {
  event: string;
  data: Record<string, unknown>;
  /** The last `id:` seen (the WHATWG "last event ID"): resume after it with Last-Event-ID. */
  id?: string;
}

/** Split an SSE byte stream into events (the WHATWG rules that matter here: `event:`,
 *  multi-line `data:`, `id:`, comments, CRLF or LF line ends). */
export class SseParser {
  private buffer = "";
  private lastId: string | undefined;

  push(chunk: string): StreamEvent[] {
    this.buffer += chunk.replace(/\r\n?/g, "\n");
    const events: StreamEvent[] = [];
    let end: number;
    while ((end = this.buffer.indexOf("\n\n")) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      let event = "message";
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
        else if (field === "id") this.lastId = value;
      }
      if (!data.length) continue;
      try {
        events.push({ event, data: JSON.parse(data.join("\n")), id: this.lastId });
      } catch {
        // not JSON: not one of ours
      }
    }
    return events;
  }
}

/** Read one event stream until it ends or `signal` aborts, after `lastEventId` if given;
 *  with `body`, the stream is the answer to a POST of it as JSON (generate).
 *  Throws ApiError on an error answer. */
export async function readEvents(
  path: string, onEvent: (e: StreamEvent) => void, signal: AbortSignal, lastEventId?: string, body?: unknown,
): Promise<void> {
  const extra: Record<string, string> = { Accept: "text/event-stream" };
  if (lastEventId !== undefined) extra["Last-Event-ID"] = lastEventId;
  if (body !== undefined) extra["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST", body: body === undefined ? undefined : JSON.stringify(body),
    headers: headers(extra), signal, cache: "no-store",
  });
  if (!response.ok) throw await failure(response);
  if (!response.body) return;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SseParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      for (const event of parser.push(value)) onEvent(event);
    }
  } finally {
    reader.releaseLock();
  }
}

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

/** Follow a job's events until the job ends, across as many streams as that takes: the
 *  server ends a stream after a while (`end`), and connections drop; each reconnection
 *  sends the last event id (Last-Event-ID), so the next stream gives exactly what was
 *  missed (or a fresh snapshot when that is no longer held). `end` reconnects at once;
 *  errors with back-off. `end` and `error` are not passed on. */
export async function followJob(jobId: string, onEvent: (e: StreamEvent) => void, signal: AbortSignal): Promise<void> {
  let delay = 500;
  let finished = false;
  let lastId: string | undefined;
  while (!signal.aborted && !finished) {
    let ended = false;
    try {
      await readEvents(`/v1/jobs/${encodeURIComponent(jobId)}/events`, (e) => {
        delay = 500;
        if (e.id !== undefined) lastId = e.id;
        if (e.event === "end") ended = true;
        if (e.event === "end" || e.event === "error") return;
        if (e.event === "state" && FINAL.has(String(e.data.state))) finished = true;
        onEvent(e);
      }, signal, lastId);
    } catch (error) {
      if (signal.aborted) return;
      // 401, 404: retrying will not help; 429 (this project's streams are all open): it may
      if (error instanceof ApiError && error.status !== 503 && error.status !== 429) throw error;
    }
    if (finished || signal.aborted) return;
    if (ended) continue;
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 10_000);
  }
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

export function isFinal(state: string): boolean {
  return FINAL.has(state);
}
