import { describe, expect, it } from 'vitest';

import {
  colorFor,
  firstVisible,
  fit,
  formatDuration,
  longestSpan,
  niceStep,
  parseTimeline,
  phaseRects,
  spanAt,
  spanEnd,
  spanLines,
  tickLabel,
  TimelineData,
  toTime,
  toX,
  zoom
} from '../src/timelineModel';
import type { ISpan } from '../src/views.gen';

let seq = 0;

function span(over: Partial<ISpan> = {}): ISpan {
  seq++;
  return {
    seq,
    task_id: `t${seq}`,
    name: 'f',
    state: 'finished',
    job_id: 'j',
    node_id: 'n1',
    worker_id: 'w1',
    pid: 100,
    actor_id: null,
    notebook: null,
    cell: null,
    submitted_at: 9,
    sent_at: 9.5,
    started_at: 10,
    fetch: 0.1,
    run: 1,
    store: 0.2,
    ended_at: 11.4,
    ...over
  };
}

function body(spans: ISpan[], next = spans.length ? spans[spans.length - 1].seq : 0) {
  return { spans, next, capacity: 100000, dropped: 0 };
}

describe('timeline data', () => {
  it('groups lanes by node, then worker pid, and orders spans by start', () => {
    const d = new TimelineData();
    d.setNodeNames({ n1: 'beta', n2: 'alpha' });
    d.merge(
      body([
        span({ worker_id: 'w2', pid: 7, started_at: 20 }),
        span({ started_at: 15 }),
        span({ node_id: 'n2', worker_id: 'w3', pid: 50 }),
        span({ started_at: 12 }) // out of order within its lane
      ])
    );
    const lanes = d.lanes;
    expect(lanes.map(l => l.workerId)).toEqual(['w3', 'w2', 'w1']);
    expect(lanes.map(l => l.group)).toEqual([0, 1, 1]);
    expect(lanes[2].spans.map(s => s.started_at)).toEqual([12, 15]);
    expect(d.laneLabel(lanes[0])).toBe('alpha · 50');
    expect(d.extent).toEqual({ t0: 10, t1: 20 + 1.3 });
    expect(d.size).toBe(4);
  });

  it('merges incrementally, stays bounded, and starts over after a head restart', () => {
    const d = new TimelineData(100);
    const all: ISpan[] = [];
    for (let i = 0; i < 300; i++) {
      all.push(span({ started_at: 10 + i, worker_id: `w${i % 4}` }));
    }
    for (let i = 0; i < 300; i += 30) {
      expect(d.merge(body(all.slice(i, i + 30)))).toBe(true);
    }
    expect(d.size).toBeLessThanOrEqual(110);
    expect(d.size).toBeGreaterThanOrEqual(100);
    const kept = d.lanes.flatMap(l => l.spans);
    expect(kept.length).toBe(d.size);
    expect(Math.min(...kept.map(s => s.started_at ?? 0))).toBe(d.extent?.t0);
    expect(d.next).toBe(all[299].seq);
    expect(d.merge(body([], d.next))).toBe(false);
    d.merge(body([span()], 1)); // numbers went back: a new head
    expect(d.size).toBe(1);
  });

  it('reads the REST body and leaves malformed spans out', () => {
    const good = span();
    const parsed = parseTimeline({ spans: [good, { nonsense: 1 }, null], next: 5 });
    expect(parsed?.spans).toEqual([good]);
    expect(parsed?.next).toBe(5);
    expect(parseTimeline({ spans: 'x', next: 1 })).toBeNull();
    expect(parseTimeline(null)).toBeNull();
  });
});

describe('timeline geometry', () => {
  it('maps time to pixels and back, zooms around a point', () => {
    const w = { t0: 10, t1: 20 };
    expect(toX(15, w, 200)).toBe(100);
    expect(toTime(100, w, 200)).toBe(15);
    const z = zoom(w, 0.5, 12);
    expect(z.t1 - z.t0).toBeCloseTo(5);
    expect(toX(12, z, 200)).toBeCloseTo(toX(12, w, 200)); // the anchor stays put
    const f = fit({ t0: 0, t1: 100 });
    expect(f.t0).toBeLessThan(0);
    expect(f.t1).toBeGreaterThan(100);
  });

  it('shades phases one after the other; a span with no answer is one block', () => {
    const w = { t0: 10, t1: 12 };
    const rects = phaseRects(span(), w, 200);
    expect(rects).toHaveLength(3);
    expect(rects[0][0]).toBe(0);
    expect(rects[0][1]).toBeCloseTo(10);
    expect(rects[1][0]).toBeCloseTo(10);
    expect(rects[1][1]).toBeCloseTo(100);
    expect(rects[2][0] + rects[2][1]).toBeCloseTo(130);
    const dead = span({ started_at: null, sent_at: 10.5, ended_at: 11 });
    expect(phaseRects(dead, w, 200)).toEqual([[50, 50]]);
    expect(spanEnd(dead)).toBe(11);
  });

  it('finds visible spans and the span under the pointer quickly', () => {
    const d = new TimelineData();
    const spans: ISpan[] = [];
    for (let i = 0; i < 2000; i++) {
      spans.push(span({ started_at: i, fetch: 0, run: 0.5, store: 0 }));
    }
    d.merge(body(spans));
    const lane = d.lanes[0];
    const longest = longestSpan(lane.spans);
    expect(longest).toBeCloseTo(0.5);
    expect(firstVisible(lane.spans, 1000.2, longest)).toBe(1000);
    expect(spanAt(lane, 1500.25, 0.01, longest)?.started_at).toBe(1500);
    expect(spanAt(lane, 1500.75, 0.01, longest)).toBeNull(); // the gap between two
    expect(spanAt(lane, 1500.505, 0.01, longest)?.started_at).toBe(1500);
  });
});

describe('timeline text', () => {
  it('colours by function, the same name the same colour', () => {
    expect(colorFor('train')).toBe(colorFor('train'));
    expect(colorFor('train')).not.toBe(colorFor('evaluate'));
  });

  it('formats durations and the tooltip', () => {
    expect(formatDuration(0.00085)).toBe('850 µs');
    expect(formatDuration(0.0123)).toBe('12.30 ms');
    expect(formatDuration(4.2)).toBe('4.20 s');
    const lines = spanLines(
      span({ state: 'failed', notebook: 'a.ipynb', cell: 'c1', name: 'Model.fit' }),
      'gpu-1'
    );
    expect(lines[0]).toBe('Model.fit — failed');
    expect(lines).toContain('from a.ipynb, cell c1');
    expect(lines).toContain('queued 1.00 s');
    expect(lines).toContain('fetch 100.0 ms · run 1.00 s · store 200.0 ms');
    expect(lines.join('\n')).toContain('on gpu-1, worker 100');
  });
});

describe('timeline axis', () => {
  it('picks round steps and labels them as precisely as needed', () => {
    expect(niceStep(0.03)).toBeCloseTo(0.05);
    expect(niceStep(0.1)).toBeCloseTo(0.1);
    expect(niceStep(1.5)).toBe(2);
    expect(tickLabel(5.08, 0.02)).toBe('5.08 s');
    expect(tickLabel(12, 5)).toBe('12 s');
    expect(tickLabel(0.25, 0.05)).toBe('250 ms');
    expect(tickLabel(0.0005, 0.0001)).toBe('500 µs');
    expect(tickLabel(0, 0.5)).toBe('0 ms');
  });
});
