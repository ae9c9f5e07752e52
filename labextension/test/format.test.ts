import { describe, expect, it } from 'vitest';

import {
  backoffDelay,
  DEFAULT_BACKOFF,
  formatAmount,
  formatBytes,
  formatBytesPair,
  formatDuration,
  formatPercent,
  formatResources,
  gpuUsers,
  ownerLabel,
  ratioPercent,
  resourceUsage,
  sparklinePoints,
  summaryText
} from '../src/format';

describe('formatting', () => {
  it('formats bytes in binary units', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(1023)).toBe('1023 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(80 * 1024 ** 3)).toBe('80 GiB');
    expect(formatBytes(-1)).toBe('–');
    expect(formatBytes(null)).toBe('–');
    expect(formatBytes(NaN)).toBe('–');
  });

  it('formats amounts and percentages', () => {
    expect(formatAmount(2)).toBe('2');
    expect(formatAmount(0.5)).toBe('0.5');
    expect(formatAmount(1 / 3)).toBe('0.33');
    expect(formatPercent(12.6)).toBe('13%');
    expect(formatPercent(140)).toBe('100%');
    expect(formatPercent(undefined)).toBe('–');
    expect(ratioPercent(1, 4)).toBe(25);
    expect(ratioPercent(1, 0)).toBe(0);
    expect(ratioPercent(5, 4)).toBe(100);
  });

  it('summarises resources used/total, CPU and GPU first', () => {
    const usage = resourceUsage(
      { memory: 8 * 1024 ** 3, zeta: 2, GPU: 2, CPU: 8 },
      { memory: 6 * 1024 ** 3, GPU: 1.5, CPU: 5 }
    );
    expect(usage.map(u => u.name)).toEqual(['CPU', 'GPU', 'memory', 'zeta']);
    expect(usage.map(u => u.text)).toEqual(['3/8', '0.5/2', '2.0 GiB/8.0 GiB', '0/2']);
  });

  it('formats a resource request', () => {
    expect(formatResources({ CPU: 1, GPU: 0.5, custom: 0 })).toBe('CPU 1 · GPU 0.5');
    expect(formatResources({ memory: 1024 })).toBe('memory 1.0 KiB');
    expect(formatResources(null)).toBe('');
  });

  it('writes the status-bar summary', () => {
    const totals = { nodes: 2, CPU: 8, CPU_used: 3, GPU: 2, GPU_used: 0.5 };
    expect(summaryText(totals, true)).toBe('nbcluster: 2 nodes · CPUs 3/8 · GPUs 0.5/2');
    expect(summaryText({ ...totals, nodes: 1 }, true)).toMatch(/^nbcluster: 1 node ·/);
    expect(summaryText(totals, false)).toBe('nbcluster: disconnected — reconnecting');
  });

  it('names the owner by notebook, kernel or job', () => {
    expect(ownerLabel({ job_id: 'j', kernel_id: 'k', notebook: 'a/b/c.ipynb' })).toBe('c.ipynb');
    expect(ownerLabel({ job_id: 'j', kernel_id: '0123456789', notebook: null })).toBe(
      'kernel 01234567'
    );
    expect(ownerLabel({ job_id: 'job-abcdefgh', kernel_id: null, notebook: null })).toBe(
      'job job-abcd'
    );
    expect(ownerLabel(null)).toBe('–');
  });

  it('formats durations', () => {
    expect(formatDuration(4.2)).toBe('4s');
    expect(formatDuration(125)).toBe('2m 5s');
    expect(formatDuration(3780)).toBe('1h 3m');
    expect(formatDuration(-1)).toBe('–');
  });
});

describe('sparklinePoints', () => {
  it('draws right-aligned, newest at the right edge', () => {
    expect(sparklinePoints([0, 100], 10, 10, 11)).toBe('9,10 10,0');
    const full = sparklinePoints([0, 50, 100], 10, 10, 3);
    expect(full).toBe('0,10 5,5 10,0');
  });

  it('clamps and truncates', () => {
    expect(sparklinePoints([-5, 200], 10, 10, 2)).toBe('0,10 10,0');
    expect(sparklinePoints([1, 2, 3, 4], 10, 10, 2).split(' ')).toHaveLength(2);
    expect(sparklinePoints([], 10, 10, 5)).toBe('');
  });
});

describe('backoffDelay', () => {
  const noJitter = { ...DEFAULT_BACKOFF, jitter: 0 };

  it('grows exponentially up to the cap', () => {
    const delays = [0, 1, 2, 3, 4, 5, 6, 10].map(n => backoffDelay(n, noJitter));
    expect(delays).toEqual([500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
  });

  it('jitters within ±20% and never past the cap', () => {
    expect(backoffDelay(0, DEFAULT_BACKOFF, () => 0)).toBe(400);
    expect(backoffDelay(0, DEFAULT_BACKOFF, () => 0.999999)).toBe(600);
    expect(backoffDelay(20, DEFAULT_BACKOFF, () => 0.999999)).toBe(10000);
    expect(backoffDelay(20, DEFAULT_BACKOFF, () => 0)).toBe(8000);
  });
});

describe('formatBytesPair', () => {
  it('writes used/total in the unit of the total', () => {
    expect(formatBytesPair(1.4 * 1024 ** 3, 24 * 1024 ** 3)).toBe('1.4/24 GiB');
    expect(formatBytesPair(20 * 1024 ** 3, 80 * 1024 ** 3)).toBe('20/80 GiB');
    expect(formatBytesPair(512 * 1024 ** 2, 2 * 1024 ** 3)).toBe('0.5/2 GiB');
    expect(formatBytesPair(10, 100)).toBe('10/100 B');
    expect(formatBytesPair(1, 0)).toBe('1 B/0 B');
    expect(formatBytesPair(NaN, 1)).toBe('–/1 B');
  });
});

describe('gpuUsers', () => {
  const proc = (over: object) => ({
    pid: 1,
    memory_used: 0,
    utilization: null,
    worker_id: null,
    kind: null,
    name: null,
    id: null,
    job_id: null,
    notebook: null,
    ...over
  });

  it('names tasks and actors, largest memory first', () => {
    expect(
      gpuUsers([
        proc({ pid: 7, memory_used: 1024 ** 3, kind: 'task', name: 'train_step' }),
        proc({ pid: 8, memory_used: 3 * 1024 ** 3, kind: 'actor', name: 'Trainer', utilization: 40 }),
        proc({ pid: 9, memory_used: 512 * 1024 ** 2 }),
        proc({ pid: 10, memory_used: 1024, kind: 'worker' })
      ])
    ).toEqual([
      'actor Trainer · 3.0 GiB · 40%',
      'task train_step · 1.0 GiB',
      'pid 9 · 512 MiB',
      'idle worker (pid 10) · 1.0 KiB'
    ]);
  });

  it('is empty without processes', () => {
    expect(gpuUsers(undefined)).toEqual([]);
    expect(gpuUsers([])).toEqual([]);
  });
});
