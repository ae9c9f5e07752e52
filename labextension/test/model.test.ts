import { describe, expect, it } from 'vitest';

import {
  ENDED_KEPT,
  HISTORY_LENGTH,
  IActor,
  ICluster,
  IMetrics,
  INode,
  IPlacementGroup,
  ITask,
  applyMessage,
  applyMessages,
  cellGroups,
  initialState,
  mergeHistory,
  parseMessage,
  setConnection,
  totalsFromNodes,
  visibleActors,
  visibleTasks
} from '../src/model';

function metrics(time: number, cpu = 10): IMetrics {
  return {
    time,
    cpu_percent: cpu,
    memory_used: 1024,
    memory_total: 4096,
    gpus: [{ index: 0, name: 'H100', utilization: 50, memory_used: 1, memory_total: 2 }]
  };
}

function node(id: string, extra: Partial<INode> = {}): INode {
  return {
    node_id: id,
    name: `host-${id}`,
    address: '127.0.0.1',
    alive: true,
    state: 'alive',
    pid: 7,
    resources_total: { CPU: 4, GPU: 1 },
    resources_available: { CPU: 3, GPU: 1 },
    gpus: [{ index: 0, name: 'H100', memory_total: 2 }],
    gpus_free: { '0': 1 },
    workers: 1,
    leases: 1,
    store_address: 'tcp://127.0.0.1:7712',
    store_id: 's1',
    metrics: metrics(100),
    object_store: {
      capacity: 100,
      used: 0,
      spilled: 0,
      objects: 0,
      streams_served: 0,
      bytes_out: 0,
      pulls: 0,
      bytes_in: 0
    },
    tasks_running: 1,
    actors: 0,
    ...extra
  };
}

function task(id: string, state: ITask['state'], extra: Partial<ITask> = {}): ITask {
  return {
    task_id: id,
    name: 'f',
    state,
    node_id: null,
    resources: { CPU: 1 },
    missing: null,
    owner: { job_id: 'j1', kernel_id: 'k1', notebook: 'dir/a.ipynb' },
    submitted_at: 1,
    started_at: null,
    ended_at: null,
    ...extra
  };
}

function actor(id: string, state: IActor['state']): IActor {
  return {
    actor_id: id,
    class_name: 'Model',
    name: null,
    namespace: 'default',
    state,
    job_id: 'j1',
    node_id: 'n1',
    pid: 42,
    resources: { CPU: 0 },
    detached: false,
    restarts: 0,
    death_reason: null,
    created_at: 1,
    owner: { job_id: 'j1', kernel_id: null, notebook: null }
  };
}

function cluster(nodes: INode[]): ICluster {
  return {
    head: { address: '127.0.0.1:7711', started_at: 0, version: '0.1' },
    nodes,
    totals: totalsFromNodes(nodes),
    placement_groups: []
  };
}

const snapshot = (nodes: INode[], tasks: ITask[] = [], actors: IActor[] = []) =>
  applyMessage(initialState(), { type: 'snapshot', cluster: cluster(nodes), tasks, actors });

describe('parseMessage', () => {
  it('accepts the contract messages', () => {
    const snap = { type: 'snapshot', cluster: { nodes: [] }, tasks: [], actors: [] };
    expect(parseMessage(snap)?.type).toBe('snapshot');
    expect(parseMessage({ type: 'metrics', time: 1, nodes: [], totals: {} })?.type).toBe('metrics');
    expect(parseMessage({ type: 'task', task: task('t', 'queued') })?.type).toBe('task');
    expect(parseMessage({ type: 'actor', actor: actor('a', 'alive') })?.type).toBe('actor');
    expect(parseMessage({ type: 'node', node: node('n') })?.type).toBe('node');
  });

  it('rejects malformed or unknown messages', () => {
    expect(parseMessage(null)).toBeNull();
    expect(parseMessage('snapshot')).toBeNull();
    expect(parseMessage({ type: 'snapshot', cluster: {} })).toBeNull();
    expect(parseMessage({ type: 'task', task: {} })).toBeNull();
    expect(parseMessage({ type: 'actor' })).toBeNull();
    expect(parseMessage({ type: 'whatever' })).toBeNull();
  });
});

describe('applyMessage', () => {
  it('a snapshot replaces the state and marks it connected', () => {
    const s = snapshot([node('n1'), node('n2')], [task('t1', 'running')], [actor('a1', 'alive')]);
    expect(s.connection).toBe('connected');
    expect(s.nodeOrder).toEqual(['n1', 'n2']);
    expect(s.totals).toEqual({ nodes: 2, CPU: 8, CPU_used: 2, GPU: 2, GPU_used: 0 });
    expect(Object.keys(s.tasks)).toEqual(['t1']);
    expect(Object.keys(s.actors)).toEqual(['a1']);
    expect(s.history.n1).toHaveLength(1);
  });

  it('does not mutate its input', () => {
    const s = snapshot([node('n1')]);
    const frozen = JSON.stringify(s);
    applyMessage(s, { type: 'task', task: task('t1', 'queued') });
    applyMessage(s, {
      type: 'metrics',
      time: 101,
      nodes: [{ node_id: 'n1', metrics: metrics(101, 90) }],
      totals: s.totals
    });
    expect(JSON.stringify(s)).toBe(frozen);
  });

  it('metrics merge into nodes and grow a bounded history', () => {
    let s = snapshot([node('n1')]);
    for (let t = 101; t < 101 + HISTORY_LENGTH + 10; t++) {
      s = applyMessage(s, {
        type: 'metrics',
        time: t,
        nodes: [{ node_id: 'n1', metrics: metrics(t, t % 100), tasks_running: 7 }],
        totals: { nodes: 1, CPU: 4, CPU_used: 4, GPU: 1, GPU_used: 1 }
      });
    }
    expect(s.nodes.n1.tasks_running).toBe(7);
    expect(s.nodes.n1.name).toBe('host-n1'); // untouched fields survive
    expect(s.history.n1).toHaveLength(HISTORY_LENGTH);
    expect(s.history.n1[HISTORY_LENGTH - 1].time).toBe(100 + HISTORY_LENGTH + 10);
    expect(s.totals.CPU_used).toBe(4);
  });

  it('placement groups come with snapshots and metrics, removed ones left out', () => {
    const group = (id: string, state: IPlacementGroup['state']): IPlacementGroup => ({
      placement_group_id: id,
      name: '',
      namespace: '',
      job_id: 'j1',
      strategy: 'PACK',
      state,
      detached: false,
      infeasible: false,
      bundles: [{ index: 0, resources: { CPU: 1 }, node_id: 'n1', available: { CPU: 1 } }]
    });
    let s = applyMessage(initialState(), {
      type: 'snapshot',
      cluster: { ...cluster([node('n1')]), placement_groups: [group('a', 'CREATED'), group('b', 'REMOVED')] },
      tasks: [],
      actors: []
    });
    expect(s.placementGroups.map(g => g.placement_group_id)).toEqual(['a']);
    const totals = { nodes: 1, CPU: 4, CPU_used: 1, GPU: 0, GPU_used: 0 };
    s = applyMessage(s, {
      type: 'metrics',
      time: 1,
      nodes: [],
      totals,
      placement_groups: [group('a', 'CREATED'), group('c', 'PENDING')]
    });
    expect(s.placementGroups.map(g => g.state)).toEqual(['CREATED', 'PENDING']);
    // An older server's metrics carry none: the groups stay as they were.
    s = applyMessage(s, { type: 'metrics', time: 2, nodes: [], totals } as never);
    expect(s.placementGroups).toHaveLength(2);
  });

  it('a repeated sample is kept once', () => {
    let s = snapshot([node('n1')]);
    s = applyMessage(s, {
      type: 'metrics',
      time: 100,
      nodes: [{ node_id: 'n1', metrics: metrics(100) }],
      totals: s.totals
    });
    expect(s.history.n1).toHaveLength(1);
  });

  it('metrics for an unknown node add it', () => {
    let s = snapshot([node('n1')]);
    s = applyMessage(s, {
      type: 'metrics',
      time: 101,
      nodes: [{ node_id: 'n9', metrics: metrics(101) }],
      totals: s.totals
    });
    expect(s.nodeOrder).toEqual(['n1', 'n9']);
    expect(s.nodes.n9.name).toBe('n9');
  });

  it('node messages add or replace a node and update totals', () => {
    let s = snapshot([node('n1')]);
    s = applyMessage(s, { type: 'node', node: node('n2') });
    expect(s.nodeOrder).toEqual(['n1', 'n2']);
    expect(s.totals.nodes).toBe(2);
    s = applyMessage(s, { type: 'node', node: node('n2', { state: 'dead', alive: false }) });
    expect(s.nodeOrder).toEqual(['n1', 'n2']);
    expect(s.nodes.n2.state).toBe('dead');
    expect(s.totals.nodes).toBe(1); // dead nodes do not count
  });

  it('task and actor updates bump the tables version', () => {
    const s0 = snapshot([node('n1')]);
    const s1 = applyMessage(s0, { type: 'task', task: task('t1', 'queued') });
    expect(s1.tablesVersion).toBe(s0.tablesVersion + 1);
    const s2 = applyMessage(s1, { type: 'task', task: task('t1', 'running') });
    expect(s2.tasks.t1.state).toBe('running');
    const s3 = applyMessage(s2, { type: 'actor', actor: actor('a1', 'alive') });
    const s4 = applyMessage(s3, { type: 'actor', actor: actor('a1', 'dead') });
    expect(s4.actors.a1.state).toBe('dead');
    expect(s4.tablesVersion).toBe(s0.tablesVersion + 4);
  });

  it('keeps every active task but only the newest ended ones', () => {
    let s = snapshot([node('n1')], [task('live', 'running')]);
    for (let i = 0; i < ENDED_KEPT + 15; i++) {
      s = applyMessage(s, { type: 'task', task: task(`e${i}`, 'finished', { ended_at: i }) });
    }
    const ids = Object.keys(s.tasks);
    expect(ids).toContain('live');
    expect(ids).toHaveLength(ENDED_KEPT + 1);
    expect(ids).toContain(`e${ENDED_KEPT + 14}`);
    expect(ids).not.toContain('e0');
  });

  it('keeps only the newest dead actors', () => {
    let s = snapshot([node('n1')], [], [actor('live', 'alive')]);
    for (let i = 0; i < ENDED_KEPT + 5; i++) {
      s = applyMessage(s, { type: 'actor', actor: actor(`d${i}`, 'dead') });
    }
    expect(Object.keys(s.actors)).toHaveLength(ENDED_KEPT + 1);
    expect(s.actors.live).toBeDefined();
    expect(s.actors.d0).toBeUndefined();
  });

  it('a new snapshot after a reconnect keeps the sparkline history', () => {
    let s = snapshot([node('n1')]);
    s = applyMessage(s, {
      type: 'metrics',
      time: 101,
      nodes: [{ node_id: 'n1', metrics: metrics(101) }],
      totals: s.totals
    });
    s = setConnection(s, 'disconnected', 1000);
    expect(s.connection).toBe('disconnected');
    expect(s.retryInMs).toBe(1000);
    s = applyMessage(s, {
      type: 'snapshot',
      cluster: cluster([node('n1', { metrics: metrics(110) })]),
      tasks: [],
      actors: []
    });
    expect(s.connection).toBe('connected');
    expect(s.retryInMs).toBeNull();
    expect(s.history.n1.map(m => m.time)).toEqual([100, 101, 110]);
  });
});

describe('views', () => {
  it('lists active tasks, running first, and hides ended ones', () => {
    const s = snapshot(
      [node('n1')],
      [
        task('q', 'queued', { submitted_at: 1 }),
        task('done', 'finished'),
        task('inf', 'infeasible', { missing: 'GPU', submitted_at: 2 }),
        task('r', 'running', { submitted_at: 3 })
      ]
    );
    expect(visibleTasks(s).map(t => t.task_id)).toEqual(['r', 'inf', 'q']);
  });

  it('lists live actors before dead ones', () => {
    const s = snapshot([node('n1')], [], [actor('d', 'dead'), actor('a', 'alive')]);
    expect(visibleActors(s).map(a => a.actor_id)).toEqual(['a', 'd']);
  });

  it('mergeHistory prepends older samples only', () => {
    let s = snapshot([node('n1')]);
    s = mergeHistory(s, { n1: [metrics(98), metrics(99), metrics(100), metrics(101)] });
    expect(s.history.n1.map(m => m.time)).toEqual([98, 99, 100]);
  });
});

describe('applyMessages', () => {
  it('gives the same state as applying one message at a time', () => {
    const start = snapshot([node('n1')], [task('t0', 'running')], [actor('a0', 'alive')]);
    const msgs = [
      { type: 'task', task: task('t1', 'queued') },
      { type: 'task', task: task('t1', 'running') },
      { type: 'actor', actor: actor('a1', 'alive') },
      {
        type: 'metrics',
        time: 101,
        nodes: [{ node_id: 'n1', metrics: metrics(101), tasks_running: 2 }],
        totals: { nodes: 1, CPU: 4, CPU_used: 2, GPU: 1, GPU_used: 0 }
      },
      { type: 'task', task: task('t0', 'finished', { ended_at: 5 }) },
      { type: 'actor', actor: actor('a0', 'dead') },
      { type: 'node', node: node('n2') }
    ] as const;
    const frozen = JSON.stringify(start);
    const batched = applyMessages(start, [...msgs]);
    const oneByOne = msgs.reduce((s, m) => applyMessage(s, m), start);
    expect(JSON.stringify(start)).toBe(frozen);
    expect(batched.tasks).toEqual(oneByOne.tasks);
    expect(Object.keys(batched.actors)).toEqual(Object.keys(oneByOne.actors));
    expect(batched.actors).toEqual(oneByOne.actors);
    expect(batched.nodes).toEqual(oneByOne.nodes);
    expect(batched.history).toEqual(oneByOne.history);
    expect(batched.totals).toEqual(oneByOne.totals);
    expect(batched.tablesVersion).toBeGreaterThan(start.tablesVersion);
  });

  it('folds a flood of task events quickly', () => {
    const start = snapshot([node('n1')]);
    const msgs = Array.from({ length: 20000 }, (_, i) => ({
      type: 'task' as const,
      task: task(`t${i}`, 'queued', { submitted_at: i })
    }));
    const t0 = Date.now();
    const s = applyMessages(start, msgs);
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(visibleTasks(s)).toHaveLength(20000);
  });

  it('a snapshot in the batch replaces what came before it', () => {
    const start = snapshot([node('n1')]);
    const s = applyMessages(start, [
      { type: 'task', task: task('old', 'queued') },
      { type: 'snapshot', cluster: cluster([node('n1')]), tasks: [], actors: [] },
      { type: 'task', task: task('new', 'queued') }
    ]);
    expect(Object.keys(s.tasks)).toEqual(['new']);
  });
});

describe('cellGroups', () => {
  it('groups tasks by the cell that submitted them, in order of their first task', () => {
    const groups = cellGroups([
      task('t1', 'running', { cell_id: 'c1', cell_count: 3 }),
      task('t2', 'running'),
      task('t3', 'queued', { cell_id: 'c2', cell_count: 4 }),
      task('t4', 'queued', { cell_id: 'c1', cell_count: 5 }),
      task('t5', 'queued', { cell_id: 'c1', owner: { job_id: 'j2', kernel_id: null, notebook: null } })
    ]);
    expect(groups.map(g => [g.cellId, g.tasks.map(t => t.task_id)])).toEqual([
      ['c1', ['t1', 't4']],
      [null, ['t2']],
      ['c2', ['t3']],
      ['c1', ['t5']]
    ]);
    expect(groups[0].cellCount).toBe(5); // the cell's latest run
    expect(groups[0].notebook).toBe('dir/a.ipynb');
    expect(groups[3].jobId).toBe('j2'); // same cell id, another kernel: another group
  });
});
