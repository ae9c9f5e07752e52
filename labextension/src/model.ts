/**
 * Pure state of the cluster panel: a reducer that folds the server extension's
 * websocket messages (docs/jupyter-api.md; their types are generated into
 * views.gen.ts) into one immutable state. No DOM, no JupyterLab imports,
 * so that it is unit-tested under plain Node.
 */

import type {
  IActor,
  IHead,
  IMetrics,
  INode,
  IPlacementGroup,
  ITask,
  ITotals,
  ServerMessage,
  TaskState
} from './views.gen';

// The wire types are generated from the Python view schema (nbcluster/views/schema.py).
export type {
  ActorState,
  IActor,
  IBundle,
  ICluster,
  IGpuInfo,
  IGpuMetrics,
  IGpuProcess,
  IHead,
  IMetrics,
  INode,
  INodeUpdate,
  IObjectStore,
  IOwner,
  IPlacementGroup,
  ITask,
  ITotals,
  NodeState,
  Resources,
  ServerMessage,
  TaskState
} from './views.gen';

export type ConnectionStatus = 'connecting' | 'connected' | 'disconnected';

export interface IClusterState {
  connection: ConnectionStatus;
  /** Milliseconds until the next reconnection attempt, while disconnected. */
  retryInMs: number | null;
  head: IHead | null;
  /** Nodes in the order the server listed them, keyed by id. */
  nodes: Record<string, INode>;
  nodeOrder: string[];
  totals: ITotals;
  tasks: Record<string, ITask>;
  actors: Record<string, IActor>;
  /** Per node: recent metrics samples, oldest first (for the sparklines). */
  history: Record<string, IMetrics[]>;
  /** Placement groups not removed, oldest first (from snapshots and metrics messages). */
  placementGroups: IPlacementGroup[];
  /** Bumped when tasks or actors change, so the view redraws only those tables then. */
  tablesVersion: number;
}

/** Samples kept per node for the sparklines (about one per second). */
export const HISTORY_LENGTH = 60;
/** Ended tasks and dead actors kept, newest last, so the tables do not grow forever. */
export const ENDED_KEPT = 20;

export const ACTIVE_TASK_STATES: ReadonlySet<TaskState> = new Set([
  'queued',
  'running',
  'infeasible'
]);

export function emptyTotals(): ITotals {
  return { nodes: 0, CPU: 0, CPU_used: 0, GPU: 0, GPU_used: 0 };
}

export function initialState(): IClusterState {
  return {
    connection: 'connecting',
    retryInMs: null,
    head: null,
    nodes: {},
    nodeOrder: [],
    totals: emptyTotals(),
    tasks: {},
    actors: {},
    history: {},
    placementGroups: [],
    tablesVersion: 0
  };
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Check the shape of a decoded websocket frame.
 *
 * Returns the message when its `type` is known and its required fields are
 * present, else null (the caller logs and drops it: a newer server may send
 * kinds this panel does not know yet).
 */
export function parseMessage(data: unknown): ServerMessage | null {
  if (!isObject(data) || typeof data.type !== 'string') {
    return null;
  }
  switch (data.type) {
    case 'snapshot':
      return isObject(data.cluster) &&
        Array.isArray(data.cluster.nodes) &&
        Array.isArray(data.tasks) &&
        Array.isArray(data.actors)
        ? (data as unknown as ServerMessage)
        : null;
    case 'metrics':
      return Array.isArray(data.nodes) ? (data as unknown as ServerMessage) : null;
    case 'node':
      return isObject(data.node) && typeof data.node.node_id === 'string'
        ? (data as unknown as ServerMessage)
        : null;
    case 'task':
      return isObject(data.task) && typeof data.task.task_id === 'string'
        ? (data as unknown as ServerMessage)
        : null;
    case 'actor':
      return isObject(data.actor) && typeof data.actor.actor_id === 'string'
        ? (data as unknown as ServerMessage)
        : null;
    default:
      return null;
  }
}

function pushSample(history: IMetrics[] | undefined, sample: IMetrics): IMetrics[] {
  const previous = history ?? [];
  // The same sample can arrive twice (snapshot then metrics): keep one.
  if (previous.length > 0 && previous[previous.length - 1].time >= sample.time) {
    return previous;
  }
  const next = previous.concat([sample]);
  return next.length > HISTORY_LENGTH ? next.slice(next.length - HISTORY_LENGTH) : next;
}

function normaliseNode(node: INode): INode {
  return {
    ...node,
    name: node.name || node.node_id,
    resources_total: node.resources_total ?? {},
    resources_available: node.resources_available ?? {},
    metrics: node.metrics ?? null,
    object_store: node.object_store ?? null,
    tasks_running: node.tasks_running ?? 0,
    actors: node.actors ?? 0
  };
}

/** A node known only from a metrics update (its `node` message is yet to come). */
export function unknownNode(nodeId: string): INode {
  return {
    node_id: nodeId,
    name: nodeId,
    address: '',
    alive: true,
    state: 'alive',
    pid: 0,
    resources_total: {},
    resources_available: {},
    gpus: [],
    gpus_free: {},
    workers: 0,
    leases: 0,
    store_address: '',
    store_id: '',
    object_store: null,
    metrics: null,
    tasks_running: 0,
    actors: 0,
    labels: {}
  };
}

/** Keep every active task and only the newest `ENDED_KEPT` ended ones. */
export function pruneTasks(tasks: Record<string, ITask>): Record<string, ITask> {
  const ended = Object.values(tasks).filter(t => !ACTIVE_TASK_STATES.has(t.state));
  if (ended.length <= ENDED_KEPT) {
    return tasks;
  }
  ended.sort((a, b) => (a.ended_at ?? 0) - (b.ended_at ?? 0));
  const drop = new Set(ended.slice(0, ended.length - ENDED_KEPT).map(t => t.task_id));
  const kept: Record<string, ITask> = {};
  for (const [id, task] of Object.entries(tasks)) {
    if (!drop.has(id)) {
      kept[id] = task;
    }
  }
  return kept;
}

/** Keep every live actor and only the newest `ENDED_KEPT` dead ones (insertion order). */
export function pruneActors(actors: Record<string, IActor>): Record<string, IActor> {
  const dead = Object.values(actors).filter(a => a.state === 'dead');
  if (dead.length <= ENDED_KEPT) {
    return actors;
  }
  const drop = new Set(dead.slice(0, dead.length - ENDED_KEPT).map(a => a.actor_id));
  const kept: Record<string, IActor> = {};
  for (const [id, actor] of Object.entries(actors)) {
    if (!drop.has(id)) {
      kept[id] = actor;
    }
  }
  return kept;
}

/** Totals computed from the nodes, for when the server sent none. */
export function totalsFromNodes(nodes: INode[]): ITotals {
  const totals = emptyTotals();
  for (const node of nodes) {
    if (node.state === 'dead') {
      continue;
    }
    totals.nodes += 1;
    const cpu = node.resources_total.CPU ?? 0;
    const gpu = node.resources_total.GPU ?? 0;
    totals.CPU += cpu;
    totals.GPU += gpu;
    totals.CPU_used += cpu - (node.resources_available.CPU ?? cpu);
    totals.GPU_used += gpu - (node.resources_available.GPU ?? gpu);
  }
  return totals;
}

/**
 * Fold one server message into the state.
 *
 * Pure: returns a new state object (sharing unchanged parts) and never
 * mutates its arguments.
 */
export function applyMessage(state: IClusterState, msg: ServerMessage): IClusterState {
  switch (msg.type) {
    case 'snapshot': {
      const nodes: Record<string, INode> = {};
      const history: Record<string, IMetrics[]> = {};
      const order: string[] = [];
      for (const raw of msg.cluster.nodes) {
        const node = normaliseNode(raw);
        nodes[node.node_id] = node;
        order.push(node.node_id);
        // History survives a reconnect: the sparkline just continues.
        const old = state.history[node.node_id];
        history[node.node_id] = node.metrics ? pushSample(old, node.metrics) : (old ?? []);
      }
      const tasks: Record<string, ITask> = {};
      for (const task of msg.tasks) {
        tasks[task.task_id] = task;
      }
      const actors: Record<string, IActor> = {};
      for (const actor of msg.actors) {
        actors[actor.actor_id] = actor;
      }
      const nodeList = order.map(id => nodes[id]);
      return {
        ...state,
        connection: 'connected',
        retryInMs: null,
        head: msg.cluster.head ?? null,
        nodes,
        nodeOrder: order,
        totals: msg.cluster.totals ?? totalsFromNodes(nodeList),
        tasks: pruneTasks(tasks),
        actors: pruneActors(actors),
        history,
        placementGroups: (msg.cluster.placement_groups ?? []).filter(g => g.state !== 'REMOVED'),
        tablesVersion: state.tablesVersion + 1
      };
    }
    case 'metrics': {
      const nodes = { ...state.nodes };
      const history = { ...state.history };
      const order = state.nodeOrder.slice();
      for (const update of msg.nodes) {
        const current: INode = nodes[update.node_id] ?? unknownNode(update.node_id);
        if (!(update.node_id in state.nodes)) {
          order.push(update.node_id);
        }
        const merged: INode = { ...current };
        for (const key of [
          'alive',
          'state',
          'metrics',
          'resources_available',
          'object_store',
          'tasks_running',
          'actors'
        ] as const) {
          if (update[key] !== undefined) {
            (merged as unknown as Record<string, unknown>)[key] = update[key];
          }
        }
        nodes[update.node_id] = merged;
        if (update.metrics) {
          history[update.node_id] = pushSample(history[update.node_id], update.metrics);
        }
      }
      return {
        ...state,
        nodes,
        nodeOrder: order,
        history,
        totals: msg.totals ?? totalsFromNodes(order.map(id => nodes[id])),
        placementGroups: msg.placement_groups ?? state.placementGroups
      };
    }
    case 'node': {
      const node = normaliseNode(msg.node);
      const nodes = { ...state.nodes, [node.node_id]: node };
      const order = node.node_id in state.nodes ? state.nodeOrder : [...state.nodeOrder, node.node_id];
      const history = node.metrics
        ? { ...state.history, [node.node_id]: pushSample(state.history[node.node_id], node.metrics) }
        : state.history;
      return {
        ...state,
        nodes,
        nodeOrder: order,
        history,
        totals: totalsFromNodes(order.map(id => nodes[id]))
      };
    }
    case 'task':
      return {
        ...state,
        tasks: pruneTasks({ ...state.tasks, [msg.task.task_id]: msg.task }),
        tablesVersion: state.tablesVersion + 1
      };
    case 'actor': {
      // Re-insert so that a newly dead actor counts as the newest dead one.
      const actors = { ...state.actors };
      delete actors[msg.actor.actor_id];
      actors[msg.actor.actor_id] = msg.actor;
      return {
        ...state,
        actors: pruneActors(actors),
        tablesVersion: state.tablesVersion + 1
      };
    }
    default:
      return state;
  }
}

/**
 * Fold a batch of messages, as `applyMessage` one by one would.
 *
 * Task and actor changes go into one copy of their table per run of such
 * messages, so a flood of task events costs O(n), not O(n) per event.
 */
export function applyMessages(state: IClusterState, msgs: ServerMessage[]): IClusterState {
  let current = state;
  let tasks: Record<string, ITask> | null = null;
  let actors: Record<string, IActor> | null = null;
  const flush = (): void => {
    if (tasks !== null) {
      current = { ...current, tasks: pruneTasks(tasks), tablesVersion: current.tablesVersion + 1 };
      tasks = null;
    }
    if (actors !== null) {
      current = {
        ...current,
        actors: pruneActors(actors),
        tablesVersion: current.tablesVersion + 1
      };
      actors = null;
    }
  };
  for (const msg of msgs) {
    if (msg.type === 'task') {
      tasks = tasks ?? { ...current.tasks };
      tasks[msg.task.task_id] = msg.task;
    } else if (msg.type === 'actor') {
      actors = actors ?? { ...current.actors };
      delete actors[msg.actor.actor_id]; // re-inserted: the newest dead actor is kept longest
      actors[msg.actor.actor_id] = msg.actor;
    } else {
      flush();
      current = applyMessage(current, msg);
    }
  }
  flush();
  return current;
}

/** Record a connection change (the data is kept, shown as stale while disconnected). */
export function setConnection(
  state: IClusterState,
  connection: ConnectionStatus,
  retryInMs: number | null = null
): IClusterState {
  return { ...state, connection, retryInMs };
}

/** Seed the sparklines from `GET nbcluster/api/metrics` (histories oldest first). */
export function mergeHistory(
  state: IClusterState,
  histories: Record<string, IMetrics[]>
): IClusterState {
  const history = { ...state.history };
  for (const [nodeId, samples] of Object.entries(histories)) {
    if (!Array.isArray(samples)) {
      continue;
    }
    const current = history[nodeId] ?? [];
    // Live samples win; the fetched history only fills in what came before them.
    const oldestLive = current.length > 0 ? current[0].time : Infinity;
    const older = samples.filter(s => s && typeof s.time === 'number' && s.time < oldestLive);
    const merged = older.concat(current);
    history[nodeId] =
      merged.length > HISTORY_LENGTH ? merged.slice(merged.length - HISTORY_LENGTH) : merged;
  }
  return { ...state, history };
}

/** Tasks to list: active ones first (running, queued, infeasible), by submission time. */
export function visibleTasks(state: IClusterState): ITask[] {
  const rank: Record<string, number> = { running: 0, infeasible: 1, queued: 2 };
  return Object.values(state.tasks)
    .filter(t => ACTIVE_TASK_STATES.has(t.state))
    .sort(
      (a, b) => (rank[a.state] ?? 3) - (rank[b.state] ?? 3) || a.submitted_at - b.submitted_at
    );
}

/** Actors to list: live ones first, then the recently dead. */
export function visibleActors(state: IClusterState): IActor[] {
  const all = Object.values(state.actors);
  return all.filter(a => a.state !== 'dead').concat(all.filter(a => a.state === 'dead'));
}

/** The tasks one notebook cell submitted (or, with `cellId` null, tasks of no known cell). */
export interface ICellGroup {
  key: string;
  jobId: string;
  cellId: string | null;
  cellCount: number | null;
  notebook: string | null;
  tasks: ITask[];
}

/**
 * Tasks grouped by the notebook cell that submitted them, groups in the order of their first
 * task; each task without a cell is a group of its own (shown without a header).
 */
export function cellGroups(tasks: ITask[]): ICellGroup[] {
  const groups: ICellGroup[] = [];
  const byKey = new Map<string, ICellGroup>();
  for (const task of tasks) {
    const jobId = task.owner?.job_id ?? '';
    if (!task.cell_id) {
      groups.push({
        key: `task:${task.task_id}`,
        jobId,
        cellId: null,
        cellCount: null,
        notebook: task.owner?.notebook ?? null,
        tasks: [task]
      });
      continue;
    }
    const key = `${jobId}/${task.cell_id}`;
    let group = byKey.get(key);
    if (!group) {
      group = {
        key,
        jobId,
        cellId: task.cell_id,
        cellCount: task.cell_count ?? null,
        notebook: task.owner?.notebook ?? null,
        tasks: []
      };
      byKey.set(key, group);
      groups.push(group);
    }
    group.tasks.push(task);
    if (task.cell_count !== null && task.cell_count !== undefined) {
      group.cellCount = Math.max(group.cellCount ?? 0, task.cell_count); // its latest run
    }
  }
  return groups;
}
