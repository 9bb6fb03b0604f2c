// Sign-in: the user pastes a project token; it is checked against the API, then kept in
// this browser's localStorage and sent as a Bearer header (never in a URL).

import { api, ApiError, setToken } from "../api";
import { errorBox, h, replace } from "../dom";

export function loginPage(root: HTMLElement, reason: string | null, onSignedIn: () => void): void {
  document.title = "Sign in · unroll";
  const input = h("input", {
    id: "token", name: "token", type: "password", required: true, autocomplete: "current-password",
    spellcheck: "false", placeholder: "unroll_…", "aria-describedby": "token-help",
  });
  const message = h("div", { "aria-live": "assertive" }, reason ? errorBox(reason) : null);
  const submit = h("button", { type: "submit" }, "Sign in");
  const form = h("form", { class: "login", "aria-labelledby": "login-h" },
    h("h1", { id: "login-h", tabindex: -1 }, "Sign in to unroll"),
    h("label", { for: "token" }, "Project token"), input,
    h("p", { id: "token-help", class: "muted" },
      "Create one with ", h("code", {}, "unroll token create --project NAME"),
      " (the token is its last line of output); ", h("code", {}, "make up"), " prints one too. ",
      "It is stored in this browser only and sent as an Authorization header."),
    submit, message);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    submit.disabled = true;
    try {
      await api("/v1/jobs", { query: { limit: 1 }, token });
      setToken(token);
      onSignedIn();
    } catch (error) {
      const text = error instanceof ApiError && error.status === 401
        ? "That token was not accepted: check it, or create a new one."
        : `Could not reach the API: ${(error as Error).message}`;
      replace(message, errorBox(text));
      submit.disabled = false;
      input.focus();
    }
  });
  replace(root, form);
  input.focus();
}
