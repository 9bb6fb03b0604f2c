// The API's shapes that the dashboard reads (service/api/schemas.py is the source of truth).

export type State = "queued" | "running" | "succeeded" | "failed" | "cancelled";

export type Point = [number, number | null];
export type Series = Record<string, Point[]>;

export interface Attempt {
  number: number;
  worker: string | null;
  started_at: string;
  ended_at: string | null;
  outcome: "succeeded" | "failed" | "cancelled" | "lost" | null;
  error: string | null;
}

export interface Job {
  id: string;
  name: string | null;
  tags: string[];
  sweep_id: string | null;
  state: State;
  priority: number;
  attempt: number;
  max_attempts: number;
  step: number;
  max_steps: number | null;
  progress: number;
  error: string | null;
  pending_reason: string | null;
  worker: string | null;
  cancel_requested: boolean;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  updated_at: string;
  config: Record<string, any>;
  summary: Record<string, any> | null;
  metrics?: Record<string, { step: number; value: number | null }> | null;
  attempts?: Attempt[] | null;
}

export interface JobList {
  jobs: Job[];
  next_cursor: string | null;
}

export interface LogLine {
  id: number;
  attempt: number;
  ts: string;
  level: string;
  line: string;
}

export interface Checkpoint {
  step: number;
  attempt: number;
  bytes: number;
  sha256: string;
  created_at: string;
  url: string;
}

export interface Stat {
  mean: number | null;
  std: number | null;
  n: number;
}

export interface SweepRow {
  point: Record<string, unknown>;
  jobs_done: number;
  jobs_total: number;
  final: Stat | null;
  best: Stat | null;
  steps: number | null;
  wall_s: number | null;
  tokens_per_s: number | null;
  peak_memory_bytes: number | null;
  clipped_fraction: number | null;
  skipped_steps: number | null;
  job_ids: string[];
  /** With early stopping: the highest rung a member reached, steps trained, steps not spent. */
  rung?: number | null;
  steps_used?: number | null;
  steps_saved?: number | null;
}

export interface SweepSummary {
  metric: string;
  goal: "max" | "min";
  axes: string[];
  rows: SweepRow[];
  best_point: Record<string, unknown> | null;
  /** With early stopping: the steps at which trials are judged. */
  rungs?: number[] | null;
}

export interface Sweep {
  id: string;
  name: string | null;
  state: State;
  created_at: string;
  grid: Record<string, unknown[]>;
  seeds: number;
  max_parallel: number | null;
  jobs: Array<Partial<Job> & { id?: string; job_id?: string }> | string[];
  summary?: SweepSummary | null;
  early_stop?: EarlyStop | null;
}

/** A sweep's early stopping, defaults filled in (SweepCreate.early_stop, service/api/schemas.py). */
export interface EarlyStop {
  metric: string;
  goal: "max" | "min";
  min_steps: number;
  reduction_factor: number;
  max_steps: number;
  mode: "asha" | "hyperband";
  resume: boolean;
  /** A trial whose metric reaches it stops there, done (summary.stopped "target"); null: none. */
  target?: number | null;
}

/** GET /v1/compare (service/api/routes/compare.py). */
export interface ComparedJob {
  id: string;
  name: string | null;
  state: State;
  sweep_id: string | null;
  step: number;
  max_steps: number | null;
  progress: number;
  created_at: string;
  finished_at: string | null;
  final: Record<string, { step: number; value: number | null }>;
  summary: Record<string, any> | null;
}

export interface AlignedSeries {
  steps: number[];
  /** job id -> one value per step (null: no point there, or a non-finite one listed in `nonfinite`) */
  values: Record<string, Array<number | null>>;
  nonfinite: Record<string, number[]>;
}

export interface Comparison {
  jobs: ComparedJob[];
  metrics: string[];
  available_metrics: string[];
  config_diff: Array<{ key: string; values: Record<string, unknown> }>;
  series: Record<string, AlignedSeries>;
}

export interface Dataset {
  id: string;
  name: string;
  sha256: string;
  bytes: number;
  created_at: string;
}
