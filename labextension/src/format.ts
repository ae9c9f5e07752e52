/**
 * Pure helpers for the panel: number formatting, resource summaries,
 * sparkline geometry and the reconnection backoff. No DOM.
 */

import type { IGpuProcess, INode, IOwner, ITotals, Resources } from './model';

const BYTE_UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** `1536` -> `"1.5 KiB"`; one decimal below 10 units, none above. */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes) || bytes < 0) {
    return '–';
  }
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < BYTE_UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || value >= 10 ? 0 : 1;
  return `${value.toFixed(digits)} ${BYTE_UNITS[unit]}`;
}

/** `"1.4/24 GiB"`: used and total in the total's unit, so that it fits in a narrow bar. */
export function formatBytesPair(used: number, total: number): string {
  if (!Number.isFinite(used) || !Number.isFinite(total) || total <= 0 || used < 0) {
    return `${formatBytes(used)}/${formatBytes(total)}`;
  }
  let unit = 0;
  let scale = 1;
  while (total / scale >= 1024 && unit < BYTE_UNITS.length - 1) {
    scale *= 1024;
    unit += 1;
  }
  const fmt = (v: number): string => {
    const x = v / scale;
    return x >= 10 || unit === 0 || Number.isInteger(x) ? x.toFixed(0) : x.toFixed(1);
  };
  return `${fmt(used)}/${fmt(total)} ${BYTE_UNITS[unit]}`;
}

/** A resource amount: integers as such, fractions (GPU 0.5) with up to two decimals. */
export function formatAmount(value: number): string {
  if (!Number.isFinite(value)) {
    return '–';
  }
  if (Number.isInteger(value)) {
    return String(value);
  }
  return String(Math.round(value * 100) / 100);
}

/** `12.345` -> `"12%"`; clamps to 0..100 so a bar never overflows. */
export function formatPercent(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) {
    return '–';
  }
  return `${Math.round(clampPercent(value))}%`;
}

export function clampPercent(value: number): number {
  if (!Number.isFinite(value)) {
    return 0;
  }
  return Math.min(100, Math.max(0, value));
}

/** `used / total * 100`, 0 when the total is unknown. */
export function ratioPercent(used: number, total: number): number {
  if (!Number.isFinite(used) || !Number.isFinite(total) || total <= 0) {
    return 0;
  }
  return clampPercent((used / total) * 100);
}

export interface IResourceUsage {
  name: string;
  used: number;
  total: number;
  /** Human text: `"1/2"`, `"1.0 GiB/8.0 GiB"` for memory. */
  text: string;
}

/**
 * Used/total per resource of a node, CPU and GPU first, then memory, then
 * custom resources alphabetically. Used is total minus available.
 */
export function resourceUsage(total: Resources, available: Resources): IResourceUsage[] {
  const order = (name: string): number =>
    name === 'CPU' ? 0 : name === 'GPU' ? 1 : name === 'memory' ? 2 : 3;
  const names = Object.keys(total).sort((a, b) => order(a) - order(b) || a.localeCompare(b));
  return names.map(name => {
    const tot = total[name] ?? 0;
    const avail = available[name] ?? tot;
    const used = Math.max(0, tot - avail);
    const text =
      name === 'memory' || name === 'object_store_memory'
        ? `${formatBytes(used)}/${formatBytes(tot)}`
        : `${formatAmount(used)}/${formatAmount(tot)}`;
    return { name, used, total: tot, text };
  });
}

/** `{"CPU": 1, "GPU": 0.5}` -> `"CPU 1 · GPU 0.5"`; zero amounts left out. */
export function formatResources(resources: Resources | null | undefined): string {
  if (!resources) {
    return '';
  }
  return Object.entries(resources)
    .filter(([, amount]) => amount !== 0)
    .map(([name, amount]) =>
      name === 'memory' ? `memory ${formatBytes(amount)}` : `${name} ${formatAmount(amount)}`
    )
    .join(' · ');
}

/** The status-bar text: `"nbcluster: 2 nodes · CPUs 3/8 · GPUs 1/2"`. */
export function summaryText(totals: ITotals, connected: boolean): string {
  if (!connected) {
    return 'nbcluster: disconnected — reconnecting';
  }
  const nodes = `${totals.nodes} node${totals.nodes === 1 ? '' : 's'}`;
  return (
    `nbcluster: ${nodes} · CPUs ${formatAmount(totals.CPU_used)}/${formatAmount(totals.CPU)}` +
    ` · GPUs ${formatAmount(totals.GPU_used)}/${formatAmount(totals.GPU)}`
  );
}

/** Who owns a task or actor: the notebook's file name, else the kernel or job. */
export function ownerLabel(owner: IOwner | null | undefined): string {
  if (!owner) {
    return '–';
  }
  if (owner.notebook) {
    const parts = owner.notebook.split('/');
    return parts[parts.length - 1] || owner.notebook;
  }
  if (owner.kernel_id) {
    return `kernel ${owner.kernel_id.slice(0, 8)}`;
  }
  return owner.job_id ? `job ${owner.job_id.slice(0, 8)}` : '–';
}

/** Elapsed seconds as `"4s"`, `"2m 5s"`, `"1h 3m"`. */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) {
    return '–';
  }
  const s = Math.floor(seconds);
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${s % 60}s`;
  }
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

/** A node's label: its name, with the address when it differs. */
export function nodeLabel(node: INode): string {
  return node.address && node.address !== node.name ? `${node.name} (${node.address})` : node.name;
}

/**
 * SVG polyline points for a sparkline of percentages (0..100), oldest first,
 * drawn right-aligned so that the newest sample is always at the right edge.
 *
 * @param values - samples in percent
 * @param width - drawing width in SVG units
 * @param height - drawing height in SVG units
 * @param capacity - how many samples span the full width
 */
export function sparklinePoints(
  values: number[],
  width: number,
  height: number,
  capacity: number
): string {
  if (values.length === 0 || capacity < 2) {
    return '';
  }
  const shown = values.slice(-capacity);
  const step = width / (capacity - 1);
  const offset = width - step * (shown.length - 1);
  return shown
    .map((v, i) => {
      const x = offset + i * step;
      const y = height - (clampPercent(v) / 100) * height;
      return `${round2(x)},${round2(y)}`;
    })
    .join(' ');
}

function round2(v: number): number {
  return Math.round(v * 100) / 100;
}

export interface IBackoffOptions {
  /** First delay in ms. */
  initialMs: number;
  /** Upper bound in ms. */
  maxMs: number;
  /** Growth per failed attempt. */
  factor: number;
  /** Fraction of the delay randomised (0.2 -> ±20%) so that tabs do not retry in lockstep. */
  jitter: number;
}

export const DEFAULT_BACKOFF: IBackoffOptions = {
  initialMs: 500,
  maxMs: 10000,
  factor: 2,
  jitter: 0.2
};

/**
 * Delay before reconnection attempt number `attempt` (0 for the first retry):
 * exponential, capped, jittered.
 *
 * @param random - a source in [0, 1), injectable for tests
 */
export function backoffDelay(
  attempt: number,
  options: IBackoffOptions = DEFAULT_BACKOFF,
  random: () => number = Math.random
): number {
  const n = Math.max(0, Math.floor(attempt));
  const base = Math.min(options.maxMs, options.initialMs * Math.pow(options.factor, n));
  const spread = base * options.jitter;
  const delay = base - spread + 2 * spread * random();
  return Math.round(Math.min(options.maxMs, Math.max(0, delay)));
}

/**
 * Who uses a GPU, largest memory first, as one line each:
 * `"actor Trainer · 3 GiB · 40%"`, `"task train_step · 1 GiB"`, `"pid 4242 · 512 MiB"`.
 */
export function gpuUsers(processes: IGpuProcess[] | null | undefined): string[] {
  return [...(processes ?? [])]
    .sort((a, b) => b.memory_used - a.memory_used || a.pid - b.pid)
    .map(p => {
      const who =
        p.kind === 'task' || p.kind === 'actor'
          ? `${p.kind} ${p.name ?? p.id ?? '?'}`
          : p.kind === 'worker'
            ? `idle worker (pid ${p.pid})`
            : `pid ${p.pid}`;
      const util = p.utilization === null || p.utilization === undefined ? '' : ` · ${formatPercent(p.utilization)}`;
      return `${who} · ${formatBytes(p.memory_used)}${util}`;
    });
}
