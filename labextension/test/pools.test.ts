import { describe, expect, it } from 'vitest';

import { parsePools, poolSummary, visibleJobs } from '../src/poolsModel';

const times = { submitted_at: 1, joined_at: null, ended_at: null };
const body = {
  kinds: ['slurm'],
  pools: [
    {
      name: 'gpu',
      pool_id: 'slurm-1a2b3c4d',
      kind: 'slurm',
      describe: 'per job: 8 CPU, 1 GPU',
      lifetime: 'owned',
      adaptive: { minimum: 0, maximum: 16, idle: 300 },
      closed: false,
      counts: { pending: 1, running: 2, draining: 0, gone: 2 },
      jobs: [
        { job_id: '41', state: 'gone', node_id: 'n1', host: 'g1', reason: 'scaled down', log_tail: '', ...times },
        { job_id: '42', state: 'gone', node_id: null, host: '', reason: 'failed', log_tail: 'boom', ...times },
        { job_id: '43', state: 'running', node_id: 'n3', host: 'g3', reason: '', log_tail: '', ...times },
        { job_id: '44', state: 'pending', node_id: null, host: '', reason: 'Resources', log_tail: '', ...times }
      ]
    },
    { nonsense: true }
  ]
};

describe('pools', () => {
  it('reads the REST body and leaves malformed pools out', () => {
    const pools = parsePools(body);
    expect(pools.map(p => p.name)).toEqual(['gpu']);
    expect(pools[0].jobs[3].reason).toBe('Resources');
    expect(parsePools(null)).toEqual([]);
    expect(parsePools({ pools: 'x' })).toEqual([]);
  });

  it('summarises the counts and the adaptive bounds', () => {
    expect(poolSummary(parsePools(body)[0])).toBe('2 running, 1 pending (adaptive 0..16)');
  });

  it('shows live jobs and failed ones, not those stopped on purpose', () => {
    expect(visibleJobs(parsePools(body)[0]).map(j => j.job_id)).toEqual(['42', '43', '44']);
  });
});
