import { beforeEach, describe, expect, it, vi } from 'vitest';

import type { ServerMessage } from '../src/model';
import { EventStream, ISocketLike } from '../src/stream';

class FakeSocket implements ISocketLike {
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: unknown) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  closed = false;
  close(): void {
    this.closed = true;
  }
  serverSends(data: unknown): void {
    this.onmessage?.({ data: typeof data === 'string' ? data : JSON.stringify(data) });
  }
  serverCloses(): void {
    this.onerror?.({});
    this.onclose?.({});
  }
}

const SNAPSHOT = {
  type: 'snapshot',
  cluster: { head: null, nodes: [], totals: { nodes: 0, CPU: 0, CPU_used: 0, GPU: 0, GPU_used: 0 } },
  tasks: [],
  actors: []
};

function harness() {
  const sockets: FakeSocket[] = [];
  const timers: { fn: () => void; ms: number; cleared: boolean }[] = [];
  const statuses: [string, number | null][] = [];
  const messages: ServerMessage[] = [];
  const stream = new EventStream(
    {
      createSocket: () => {
        const s = new FakeSocket();
        sockets.push(s);
        return s;
      },
      random: () => 0.5, // no jitter
      setTimer: (fn, ms) => {
        const t = { fn, ms, cleared: false };
        timers.push(t);
        return t;
      },
      clearTimer: h => {
        (h as { cleared: boolean }).cleared = true;
      }
    },
    {
      onMessage: m => messages.push(m),
      onStatus: (s, r) => statuses.push([s, r])
    }
  );
  const fire = () => {
    const t = timers[timers.length - 1];
    expect(t.cleared).toBe(false);
    t.fn();
  };
  return { stream, sockets, timers, statuses, messages, fire };
}

describe('EventStream', () => {
  beforeEach(() => {
    vi.spyOn(console, 'warn').mockImplementation(() => undefined); // expected drops
  });

  it('connects, delivers messages and reports connected on the snapshot', () => {
    const h = harness();
    h.stream.start();
    h.stream.start(); // idempotent
    expect(h.sockets).toHaveLength(1);
    h.sockets[0].serverSends(SNAPSHOT);
    h.sockets[0].serverSends({ type: 'metrics', time: 1, nodes: [], totals: {} });
    expect(h.messages.map(m => m.type)).toEqual(['snapshot', 'metrics']);
    expect(h.statuses).toEqual([
      ['connecting', null],
      ['connected', null]
    ]);
  });

  it('drops malformed frames without closing', () => {
    const h = harness();
    h.stream.start();
    h.sockets[0].serverSends('not json');
    h.sockets[0].serverSends({ type: 'bogus' });
    expect(h.messages).toHaveLength(0);
    expect(h.sockets[0].closed).toBe(false);
  });

  it('reconnects with growing delays and resets after a snapshot', () => {
    const h = harness();
    h.stream.start();
    h.sockets[0].serverCloses();
    expect(h.statuses[h.statuses.length - 1]).toEqual(['disconnected', 500]);
    h.fire();
    expect(h.sockets).toHaveLength(2);
    h.sockets[1].serverCloses(); // the server is still down
    expect(h.timers.map(t => t.ms)).toEqual([500, 1000]);
    h.fire();
    h.sockets[2].serverCloses();
    expect(h.timers.map(t => t.ms)).toEqual([500, 1000, 2000]);
    expect(h.stream.attempts).toBe(3);
    h.fire();
    h.sockets[3].serverSends(SNAPSHOT); // the server is back
    expect(h.stream.attempts).toBe(0);
    expect(h.statuses[h.statuses.length - 1]).toEqual(['connected', null]);
    h.sockets[3].serverCloses();
    expect(h.timers[h.timers.length - 1].ms).toBe(500);
  });

  it('a socket that opens and closes without a snapshot still backs off', () => {
    const h = harness();
    h.stream.start();
    h.sockets[0].onopen?.({});
    h.sockets[0].serverCloses();
    h.fire();
    h.sockets[1].onopen?.({});
    h.sockets[1].serverCloses();
    expect(h.timers.map(t => t.ms)).toEqual([500, 1000]);
  });

  it('a socket that cannot be created is retried', () => {
    let fail = true;
    const timers: (() => void)[] = [];
    const statuses: string[] = [];
    const stream = new EventStream(
      {
        createSocket: () => {
          if (fail) {
            throw new Error('bad url');
          }
          return new FakeSocket();
        },
        setTimer: fn => timers.push(fn)
      },
      { onMessage: () => undefined, onStatus: s => statuses.push(s) }
    );
    stream.start();
    expect(statuses).toEqual(['connecting', 'disconnected']);
    fail = false;
    timers[0]();
    expect(statuses[statuses.length - 1]).toBe('connecting');
  });

  it('reconnectNow skips the wait; dispose stops everything', () => {
    const h = harness();
    h.stream.start();
    h.sockets[0].serverCloses();
    h.stream.reconnectNow();
    expect(h.timers[0].cleared).toBe(true);
    expect(h.sockets).toHaveLength(2);
    h.stream.dispose();
    expect(h.sockets[1].closed).toBe(true);
    const before = h.statuses.length;
    h.sockets[1].serverCloses(); // handlers were detached
    h.stream.start();
    expect(h.statuses.length).toBe(before);
    expect(h.sockets).toHaveLength(2);
  });
});
