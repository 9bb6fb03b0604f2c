// What the router hands a page. A page builds its content into `root` and stops all its
// work (polls, streams, charts) when `signal` aborts, which happens on navigation away.

export interface PageContext {
  url: URL;
  params: Record<string, string>;
  navigate: (to: string, options?: { replace?: boolean }) => void;
  signal: AbortSignal;
  onDispose: (fn: () => void) => void;
}

export type Page = (root: HTMLElement, context: PageContext) => void;
