/**
 * The data of the panel's "Pools" section (`GET nbcluster/api/pools`): types
 * and pure functions, kept apart from the DOM so they test in plain Node.
 */

/** One job of a pool. */
export interface IPoolJob {
  job_id: string;
  state: string; // pending | running | draining | gone
  node_id: string | null;
  host: string;
  reason: string;
  log_tail: string;
}

/** One pool as the REST route describes it. */
export interface IPool {
  name: string;
  kind: string;
  describe: string;
  adaptive: { minimum: number; maximum: number; idle: number } | null;
  counts: Record<string, number>;
  jobs: IPoolJob[];
}

function str(v: unknown): string {
  return typeof v === 'string' ? v : '';
}

/** The pools of a `GET nbcluster/api/pools` body; anything malformed is left out. */
export function parsePools(body: unknown): IPool[] {
  const raw = (body as { pools?: unknown } | null)?.pools;
  if (!Array.isArray(raw)) {
    return [];
  }
  const pools: IPool[] = [];
  for (const p of raw) {
    if (typeof p !== 'object' || p === null || typeof (p as IPool).name !== 'string') {
      continue;
    }
    const q = p as Record<string, unknown>;
    const jobs = Array.isArray(q.jobs) ? q.jobs : [];
    const a = q.adaptive as IPool['adaptive'];
    pools.push({
      name: str(q.name),
      kind: str(q.kind),
      describe: str(q.describe),
      adaptive: a && typeof a.maximum === 'number' ? a : null,
      counts: (typeof q.counts === 'object' && q.counts !== null ? q.counts : {}) as Record<
        string,
        number
      >,
      jobs: jobs
        .filter(j => typeof j === 'object' && j !== null)
        .map(j => {
          const r = j as Record<string, unknown>;
          return {
            job_id: str(r.job_id),
            state: str(r.state),
            node_id: typeof r.node_id === 'string' ? r.node_id : null,
            host: str(r.host),
            reason: str(r.reason),
            log_tail: str(r.log_tail)
          };
        })
    });
  }
  return pools;
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

/** The jobs worth a row: all but those gone on purpose long ago (failed ones stay). */
export function visibleJobs(pool: IPool): IPoolJob[] {
  return pool.jobs.filter(j => j.state !== 'gone' || j.log_tail !== '');
}
