/**
 * The timeline's pure part: spans kept (bounded), lanes (one per worker,
 * grouped by node), the time window, colours, what lies under the pointer.
 * No DOM: `timeline.ts` draws it on a canvas; `test/timeline.test.ts` tests it.
 */

import type { ISpan, ITimelineBody } from './views.gen';

/** Spans the panel keeps (the oldest are let go first). */
export const MAX_SPANS = 50_000;

/** One worker's lane: its spans ordered by start. */
export interface ILane {
  key: string;
  nodeId: string;
  workerId: string;
  pid: number;
  label: string;
  /** Index of the node's group (lanes of one node are adjacent). */
  group: number;
  spans: ISpan[];
}

/** A time window, seconds since the epoch. */
export interface IWindow {
  t0: number;
  t1: number;
}

/** Where a span's worker started it (its send time when the worker never answered). */
export function spanStart(s: ISpan): number {
  return s.started_at ?? s.sent_at;
}

/** Where a span ends on its worker's lane. */
export function spanEnd(s: ISpan): number {
  if (s.started_at === null) {
    return s.ended_at;
  }
  return s.started_at + s.fetch + s.run + s.store;
}

/** Spans from the REST body, with malformed entries left out. */
export function parseTimeline(body: unknown): ITimelineBody | null {
  if (!body || typeof body !== 'object') {
    return null;
  }
  const b = body as Partial<ITimelineBody>;
  if (!Array.isArray(b.spans) || typeof b.next !== 'number') {
    return null;
  }
  const spans = b.spans.filter(
    (s): s is ISpan =>
      !!s &&
      typeof s === 'object' &&
      typeof s.seq === 'number' &&
      typeof s.name === 'string' &&
      typeof s.worker_id === 'string' &&
      typeof s.sent_at === 'number' &&
      typeof s.ended_at === 'number'
  );
  return {
    spans,
    next: b.next,
    capacity: typeof b.capacity === 'number' ? b.capacity : 0,
    dropped: typeof b.dropped === 'number' ? b.dropped : 0
  };
}

/** Spans and their lanes, merged incrementally from the head's answers. */
export class TimelineData {
  constructor(maxSpans = MAX_SPANS) {
    this._max = maxSpans;
  }

  /** Ask the head for the spans after this one. */
  get next(): number {
    return this._next;
  }

  get size(): number {
    return this._size;
  }

  /** Lanes grouped by node (nodes by name), then by worker pid. */
  get lanes(): ILane[] {
    if (this._sorted === null) {
      this._sorted = [...this._lanes.values()].sort(
        (a, b) =>
          this._nodeLabel(a.nodeId).localeCompare(this._nodeLabel(b.nodeId)) ||
          a.nodeId.localeCompare(b.nodeId) ||
          a.pid - b.pid ||
          a.workerId.localeCompare(b.workerId)
      );
      let group = -1;
      let node: string | null = null;
      for (const lane of this._sorted) {
        if (lane.nodeId !== node) {
          node = lane.nodeId;
          group++;
        }
        lane.group = group;
      }
    }
    return this._sorted;
  }

  /** The earliest start and latest end held (null when empty). */
  get extent(): IWindow | null {
    return this._size === 0 ? null : { t0: this._t0, t1: this._t1 };
  }

  /** Node names (by id) for the lane labels. */
  setNodeNames(names: Record<string, string>): void {
    this._names = names;
    this._sorted = null;
  }

  /** Fold in an answer of `GET timeline?since=next`; returns whether anything changed. */
  merge(body: ITimelineBody): boolean {
    if (body.next < this._next) {
      this.clear(); // the head restarted: its numbers start over
    }
    this._next = body.next;
    let added = 0;
    for (const s of body.spans) {
      const key = `${s.node_id}/${s.worker_id}`;
      let lane = this._lanes.get(key);
      if (lane === undefined) {
        lane = {
          key,
          nodeId: s.node_id,
          workerId: s.worker_id,
          pid: s.pid,
          label: '',
          group: 0,
          spans: []
        };
        this._lanes.set(key, lane);
        this._sorted = null;
      }
      if (!lane.pid && s.pid) {
        lane.pid = s.pid;
      }
      insertByStart(lane.spans, s);
      this._order.push(s);
      const start = spanStart(s);
      const end = spanEnd(s);
      this._t0 = this._size === 0 && added === 0 ? start : Math.min(this._t0, start);
      this._t1 = this._size === 0 && added === 0 ? end : Math.max(this._t1, end);
      added++;
    }
    this._size += added;
    if (this._size > this._max * 1.1) {
      this._evict(this._size - this._max); // in batches: each pass walks every lane
    }
    return added > 0;
  }

  clear(): void {
    this._lanes.clear();
    this._order = [];
    this._sorted = null;
    this._size = 0;
    this._next = 0;
  }

  /** A lane's label: its node's name and the worker's pid. */
  laneLabel(lane: ILane): string {
    return `${this._nodeLabel(lane.nodeId)} · ${lane.pid || lane.workerId.slice(0, 8)}`;
  }

  private _nodeLabel(nodeId: string): string {
    return this._names[nodeId] ?? nodeId;
  }

  /** Let the `n` oldest-received spans go. */
  private _evict(n: number): void {
    const gone = new Set(this._order.slice(0, n));
    this._order = this._order.slice(n);
    for (const [key, lane] of this._lanes) {
      lane.spans = lane.spans.filter(s => !gone.has(s));
      if (lane.spans.length === 0) {
        this._lanes.delete(key);
        this._sorted = null;
      }
    }
    this._size -= n;
    this._t0 = Infinity;
    for (const lane of this._lanes.values()) {
      if (lane.spans.length > 0) {
        this._t0 = Math.min(this._t0, spanStart(lane.spans[0]));
      }
    }
  }

  private _max: number;
  private _next = 0;
  private _size = 0;
  private _t0 = 0;
  private _t1 = 0;
  private _lanes = new Map<string, ILane>();
  private _sorted: ILane[] | null = null;
  private _order: ISpan[] = [];
  private _names: Record<string, string> = {};
}

/** Insert `s` into `spans` (ordered by start): appends in the common case. */
export function insertByStart(spans: ISpan[], s: ISpan): void {
  const start = spanStart(s);
  let i = spans.length;
  while (i > 0 && spanStart(spans[i - 1]) > start) {
    i--;
  }
  if (i === spans.length) {
    spans.push(s);
  } else {
    spans.splice(i, 0, s);
  }
}

/** Index of the first span of `spans` (ordered by start) that may end after `t`. */
export function firstVisible(spans: ISpan[], t: number, longest: number): number {
  // Spans start in order; one starting before t - longest ends before t.
  let lo = 0;
  let hi = spans.length;
  const from = t - longest;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (spanStart(spans[mid]) < from) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

/** The longest span of a lane (for `firstVisible`). */
export function longestSpan(spans: ISpan[]): number {
  let m = 0;
  for (const s of spans) {
    m = Math.max(m, spanEnd(s) - spanStart(s));
  }
  return m;
}

/** Pixel x of time `t` in a window drawn `width` pixels wide. */
export function toX(t: number, w: IWindow, width: number): number {
  return ((t - w.t0) / (w.t1 - w.t0)) * width;
}

/** Time at pixel x. */
export function toTime(x: number, w: IWindow, width: number): number {
  return w.t0 + (x / width) * (w.t1 - w.t0);
}

/** Zoom by `factor` (< 1: in) around time `at`; never narrower than 1 µs. */
export function zoom(w: IWindow, factor: number, at: number): IWindow {
  const span = Math.max(1e-6, (w.t1 - w.t0) * factor);
  const left = (at - w.t0) / (w.t1 - w.t0);
  const t0 = at - left * span;
  return { t0, t1: t0 + span };
}

/** Move by `dt` seconds. */
export function pan(w: IWindow, dt: number): IWindow {
  return { t0: w.t0 + dt, t1: w.t1 + dt };
}

/** The window that shows `extent` with a little room on both sides. */
export function fit(extent: IWindow): IWindow {
  const span = Math.max(1e-3, extent.t1 - extent.t0);
  return { t0: extent.t0 - span * 0.02, t1: extent.t1 + span * 0.02 };
}

/** A step of 1, 2 or 5 times a power of ten, about `target` seconds. */
export function niceStep(target: number): number {
  const p = Math.pow(10, Math.floor(Math.log10(target)));
  for (const m of [1, 2, 5, 10]) {
    if (m * p >= target) {
      return m * p;
    }
  }
  return 10 * p;
}

/** An axis label: seconds since the first span, as precise as the ticks' `step`. */
export function tickLabel(offset: number, step: number): string {
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  if (Math.abs(offset) >= 1 || step >= 1) {
    return `${offset.toFixed(decimals)} s`;
  }
  if (step >= 1e-3) {
    return `${(offset * 1e3).toFixed(Math.max(0, decimals - 3))} ms`;
  }
  return `${(offset * 1e6).toFixed(0)} µs`;
}

/** A stable colour per function name. */
export function colorFor(name: string): string {
  let h = 0;
  for (let i = 0; i < name.length; i++) {
    h = (h * 31 + name.charCodeAt(i)) >>> 0;
  }
  return `hsl(${h % 360}, 62%, 55%)`;
}

/** The pixel rectangles of a span's phases: [fetch, run, store] (x and width). */
export function phaseRects(s: ISpan, w: IWindow, width: number): [number, number][] {
  if (s.started_at === null) {
    const x = toX(s.sent_at, w, width);
    return [[x, toX(s.ended_at, w, width) - x]];
  }
  const out: [number, number][] = [];
  let t = s.started_at;
  for (const d of [s.fetch, s.run, s.store]) {
    const x = toX(t, w, width);
    out.push([x, toX(t + d, w, width) - x]);
    t += d;
  }
  return out;
}

/** The span of `lane` under time `t`, allowing `slack` seconds either side. */
export function spanAt(lane: ILane, t: number, slack: number, longest: number): ISpan | null {
  const spans = lane.spans;
  let best: ISpan | null = null;
  let bestDist = Infinity;
  for (let i = firstVisible(spans, t - slack, longest); i < spans.length; i++) {
    const s = spans[i];
    const a = spanStart(s);
    if (a > t + slack) {
      break;
    }
    const b = spanEnd(s);
    const dist = t < a ? a - t : t > b ? t - b : 0;
    if (dist <= slack && dist < bestDist) {
      best = s;
      bestDist = dist;
    }
  }
  return best;
}

/** Seconds as a short duration: `850 µs`, `12.3 ms`, `4.20 s`. */
export function formatDuration(seconds: number): string {
  if (seconds < 1e-3) {
    return `${Math.round(seconds * 1e6)} µs`;
  }
  if (seconds < 1) {
    return `${(seconds * 1e3).toFixed(seconds < 0.1 ? 2 : 1)} ms`;
  }
  return `${seconds.toFixed(2)} s`;
}

/** The lines of a span's tooltip and details. */
export function spanLines(s: ISpan, nodeName: string): string[] {
  const lines = [
    `${s.name}${s.state === 'finished' ? '' : ` — ${s.state}`}`,
    `task ${s.task_id}`,
    `on ${nodeName}, worker ${s.pid || s.worker_id}`
  ];
  if (s.notebook || s.cell) {
    lines.push(`from ${s.notebook ?? 'a notebook'}${s.cell ? `, cell ${s.cell}` : ''}`);
  }
  const start = s.started_at ?? s.sent_at;
  lines.push(`queued ${formatDuration(Math.max(0, start - s.submitted_at))}`);
  if (s.started_at !== null) {
    lines.push(
      `fetch ${formatDuration(s.fetch)} · run ${formatDuration(s.run)} · ` +
        `store ${formatDuration(s.store)}`
    );
  } else {
    lines.push('no answer from its worker');
  }
  lines.push(`total ${formatDuration(Math.max(0, s.ended_at - s.submitted_at))}`);
  return lines;
}
