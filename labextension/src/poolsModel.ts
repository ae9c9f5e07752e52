/**
 * The data of the panel's "Pools" section (`GET nbcluster/api/pools`, typed by
 * the generated views): pure functions, apart from the DOM so they test in
 * plain Node.
 */

import { IPool, IPoolJob, IPoolsBody } from './views.gen';

export type { IPool, IPoolJob };

/** The pools of a `GET nbcluster/api/pools` body; anything malformed is left out. */
export function parsePools(body: unknown): IPool[] {
  const pools = (body as Partial<IPoolsBody> | null)?.pools;
  if (!Array.isArray(pools)) {
    return [];
  }
  return pools.filter(
    p =>
      typeof p === 'object' &&
      p !== null &&
      typeof p.name === 'string' &&
      Array.isArray(p.jobs) &&
      typeof p.counts === 'object' &&
      p.counts !== null
  );
}

/** "2 running, 1 pending (adaptive 0..16)". */
export function poolSummary(pool: IPool): string {
  const parts = ['running', 'pending', 'draining']
    .filter(s => (pool.counts[s] ?? 0) > 0)
    .map(s => `${pool.counts[s]} ${s}`);
  let text = parts.length ? parts.join(', ') : 'no jobs';
  if (pool.adaptive) {
    text += ` (adaptive ${pool.adaptive.minimum}..${pool.adaptive.maximum})`;
  }
  return text;
}

/** The jobs worth a row: all but those stopped on purpose (failed ones keep their log). */
export function visibleJobs(pool: IPool): IPoolJob[] {
  return pool.jobs.filter(j => j.state !== 'gone' || j.log_tail !== '');
}
