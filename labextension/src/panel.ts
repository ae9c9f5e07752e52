/**
 * The "Cluster" side panel: nodes with live bars and sparklines, then the
 * tasks and actors tables with cancel/kill buttons. Plain DOM, redrawn per
 * section only when that section's data changed.
 */

import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { ClusterClient } from './client';
import { LogViewer } from './logs';
import type { ILogTarget } from './logsModel';
import { MemorySection } from './memory';
import { PoolsSection } from './pools';
import { TimelineSection } from './timeline';
import {
  formatBytes,
  formatBytesPair,
  formatPercent,
  formatResources,
  gpuUsers,
  nodeLabel,
  ownerLabel,
  ratioPercent,
  resourceUsage,
  sparklinePoints,
  summaryText
} from './format';
import {
  cellGroups,
  HISTORY_LENGTH,
  IActor,
  ICellGroup,
  IClusterState,
  IMetrics,
  INode,
  IPlacementGroup,
  ITask,
  visibleActors,
  visibleTasks
} from './model';

type Child = Node | string | null | undefined | false;

/** Create an element: `h('div', {class: 'x'}, child, ...)`. */
export function h(
  tag: string,
  attrs: Record<string, string | undefined> = {},
  ...children: Child[]
): HTMLElement {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined) {
      el.setAttribute(key, value);
    }
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    el.append(child);
  }
  return el;
}

/** Rows drawn per table. */
const MAX_ROWS = 100;

const SVG_NS = 'http://www.w3.org/2000/svg';
const SPARK_W = 48;
const SPARK_H = 16;

function sparkline(values: number[], label: string): SVGSVGElement {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('class', 'nbc-spark');
  svg.setAttribute('viewBox', `0 0 ${SPARK_W} ${SPARK_H}`);
  svg.setAttribute('width', String(SPARK_W));
  svg.setAttribute('height', String(SPARK_H));
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', `${label} history`);
  const line = document.createElementNS(SVG_NS, 'polyline');
  line.setAttribute('points', sparklinePoints(values, SPARK_W, SPARK_H, HISTORY_LENGTH));
  svg.append(line);
  return svg;
}

function bar(percent: number, label: string, detail: string): HTMLElement {
  const level = percent >= 90 ? 'high' : percent >= 70 ? 'mid' : 'low';
  return h(
    'div',
    {
      class: 'nbc-bar',
      role: 'meter',
      title: detail ? `${label}: ${detail}` : label,
      'aria-label': label,
      'aria-valuemin': '0',
      'aria-valuemax': '100',
      'aria-valuenow': String(Math.round(percent))
    },
    h('div', { class: `nbc-bar-fill nbc-level-${level}`, style: `width: ${percent.toFixed(1)}%` }),
    detail ? h('span', { class: 'nbc-bar-text' }, detail) : null
  );
}

/** One gauge: label, bar (with `detail` written over it), percentage, sparkline. */
function metricRow(
  kind: string,
  label: string,
  percent: number,
  detail: string,
  history: number[]
): HTMLElement {
  return h(
    'div',
    { class: 'nbc-metric', 'data-metric': kind },
    h('span', { class: 'nbc-metric-label', title: label }, label),
    bar(percent, label, detail),
    h('span', { class: 'nbc-metric-value' }, formatPercent(percent)),
    sparkline(history, label)
  );
}

function renderNode(node: INode, history: IMetrics[]): HTMLElement {
  const m = node.metrics;
  const rows: HTMLElement[] = [];
  if (m) {
    rows.push(
      metricRow(
        'cpu',
        'CPU',
        m.cpu_percent,
        '',
        history.map(s => s.cpu_percent)
      )
    );
    const memPct = ratioPercent(m.memory_used, m.memory_total);
    rows.push(
      metricRow(
        'memory',
        'Mem',
        memPct,
        formatBytesPair(m.memory_used, m.memory_total),
        history.map(s => ratioPercent(s.memory_used, s.memory_total))
      )
    );
    for (const gpu of m.gpus ?? []) {
      const gpuHistory = history.map(s => (s.gpus ?? []).find(g => g.index === gpu.index));
      rows.push(
        h(
          'div',
          { class: 'nbc-gpu-name', title: gpu.name },
          `GPU ${gpu.index} · ${gpu.name}`
        ),
        metricRow(
          `gpu${gpu.index}-util`,
          'util',
          gpu.utilization,
          '',
          gpuHistory.map(g => g?.utilization ?? 0)
        ),
        metricRow(
          `gpu${gpu.index}-memory`,
          'mem',
          ratioPercent(gpu.memory_used, gpu.memory_total),
          formatBytesPair(gpu.memory_used, gpu.memory_total),
          gpuHistory.map(g => (g ? ratioPercent(g.memory_used, g.memory_total) : 0))
        ),
        ...gpuUsers(gpu.processes).map((text, i) =>
          h('div', { class: 'nbc-gpu-user', 'data-gpu-user': `${gpu.index}-${i}`, title: text }, text)
        )
      );
    }
  } else {
    rows.push(h('div', { class: 'nbc-muted' }, 'no metrics yet'));
  }
  const usage = resourceUsage(node.resources_total, node.resources_available);
  const store = node.object_store;
  return h(
    'div',
    { class: 'nbc-node', 'data-node-id': node.node_id, 'data-state': node.state },
    h(
      'div',
      { class: 'nbc-node-title' },
      h('span', { class: 'nbc-node-name', title: node.node_id }, nodeLabel(node)),
      h('span', { class: `nbc-badge nbc-state-${node.state}` }, node.state)
    ),
    h(
      'div',
      { class: 'nbc-resources' },
      ...usage.map(u =>
        h(
          'span',
          { class: 'nbc-resource', 'data-resource': u.name },
          `${u.name} `,
          h('b', {}, u.text)
        )
      )
    ),
    ...rows,
    h(
      'div',
      { class: 'nbc-node-foot' },
      `${node.tasks_running} running · ${node.actors} actor${node.actors === 1 ? '' : 's'}`,
      store
        ? ` · store ${formatBytes(store.used)}/${formatBytes(store.capacity)}` +
            (store.spilled > 0 ? `, ${formatBytes(store.spilled)} spilled` : '')
        : ''
    )
  );
}

function clock(t: number | null): string {
  if (!t) {
    return '';
  }
  return new Date(t * 1000).toLocaleTimeString();
}

/** One placement group: name, strategy, each bundle's resources and node; its state. */
function groupRow(group: IPlacementGroup, state: IClusterState): HTMLElement {
  const label = group.name || group.placement_group_id.slice(0, 12);
  const where = group.bundles.map(b => {
    const node = b.node_id ? state.nodes[b.node_id] : undefined;
    return `${b.index}: ${formatResources(b.resources)} on ${node?.name ?? b.node_id ?? '—'}`;
  });
  const status = group.infeasible ? 'infeasible' : group.state.toLowerCase();
  return h(
    'tr',
    { 'data-placement-group-id': group.placement_group_id, 'data-state': group.state },
    h(
      'td',
      {
        title:
          `${group.placement_group_id}\n${group.strategy}` +
          (group.detached ? '\ndetached' : '') +
          `\n${where.join('\n')}`
      },
      h('div', { class: 'nbc-name' }, label),
      h(
        'div',
        { class: group.infeasible ? 'nbc-sub nbc-infeasible' : 'nbc-sub' },
        [group.strategy, `${group.bundles.length} bundle(s)`, group.detached ? 'detached' : '']
          .filter(Boolean)
          .join(' · ')
      )
    ),
    h('td', {}, h('span', { class: `nbc-badge nbc-group-${status}` }, status)),
    h('td', { class: 'nbc-action' }, null)
  );
}

/** The "Cluster" panel widget. */
/** Opens a widget in JupyterLab's main area (the logs). */
export type OpenWidget = (widget: Widget) => void;
/** Opens a notebook and brings one of its cells into view. */
export type GoToCell = (notebook: string, cellId: string) => Promise<void>;

export class ClusterPanel extends Widget {
  /** `open`: opens a widget in the main area (logs); `goToCell`: shows a notebook's cell;
   * `openTimeline`: opens the timeline in a main-area tab (its section's button). */
  constructor(
    client: ClusterClient,
    open: OpenWidget | null = null,
    goToCell: GoToCell | null = null,
    openTimeline?: () => void
  ) {
    super();
    this._client = client;
    this._open = open;
    this._goToCell = goToCell;
    this._timeline = new TimelineSection({
      nodeNames: () => nodeNames(client.state),
      maxHeight: 240,
      openTab: openTimeline
    });
    this.addClass('nbc-panel');
    this.title.caption = 'nbcluster: nodes, tasks and actors';
    this._banner = h('div', { class: 'nbc-banner', role: 'status' });
    this._summary = h('div', { class: 'nbc-summary' });
    this._nodes = h('div', { class: 'nbc-nodes' });
    this._tasks = h('div', { class: 'nbc-tasks' });
    this._actors = h('div', { class: 'nbc-actors' });
    this._groups = h('div', { class: 'nbc-groups' });
    this.node.append(
      h('div', { class: 'nbc-header' }, h('h2', {}, 'Cluster'), this._summary),
      this._banner,
      h('h3', {}, 'Nodes'),
      this._nodes,
      this._tasks,
      this._timeline.node,
      this._actors,
      this._groups,
      this._memory.node,
      this._pools.node
    );
    client.changed.connect(this._schedule, this);
    this._render(client.state);
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._client.changed.disconnect(this._schedule, this);
    this._pools.dispose();
    this._memory.dispose();
    this._timeline.dispose();
    if (this._frame !== null) {
      cancelAnimationFrame(this._frame);
    }
    super.dispose();
  }

  protected onAfterShow(): void {
    this._render(this._client.state);
    this._pools.start();
    this._memory.start();
    this._timeline.start();
  }

  protected onAfterHide(): void {
    this._pools.stop();
    this._memory.stop();
    this._timeline.stop();
  }

  protected onResize(): void {
    this._timeline.draw();
  }

  /** Coalesce bursts of messages into one redraw per frame; none while hidden. */
  private _schedule(): void {
    if (this._frame !== null || !this.isVisible) {
      return;
    }
    this._frame = requestAnimationFrame(() => {
      this._frame = null;
      this._render(this._client.state);
    });
  }

  private _render(state: IClusterState): void {
    const connected = state.connection === 'connected';
    // Data from a lost connection is stale (greyed) until the next snapshot.
    this.node.dataset.connection =
      !connected && state.head !== null ? 'disconnected' : state.connection;
    this._renderBanner(state);
    this._summary.textContent = connected
      ? summaryText(state.totals, true).replace(/^nbcluster: /, '')
      : '';
    if (state.nodeOrder.length === 0) {
      this._nodes.replaceChildren(
        h('div', { class: 'nbc-muted' }, connected ? 'No nodes.' : 'Waiting for the cluster…')
      );
    } else {
      this._nodes.replaceChildren(
        ...state.nodeOrder.map(id => renderNode(state.nodes[id], state.history[id] ?? []))
      );
    }
    const tablesKey = `${state.tablesVersion}:${connected}`;
    if (tablesKey !== this._tablesKey) {
      this._tablesKey = tablesKey;
      this._renderTasks(state, connected);
      this._renderActors(state, connected);
    }
    // Groups come with every metrics message: redraw only when they changed.
    const groupsKey = `${JSON.stringify(state.placementGroups)}:${connected}`;
    if (groupsKey !== this._groupsKey) {
      this._groupsKey = groupsKey;
      this._renderGroups(state);
    }
  }

  private _renderGroups(state: IClusterState): void {
    const groups = state.placementGroups;
    this._groups.replaceChildren(
      ...this._table(
        `Placement groups (${groups.length})`,
        'Group · bundles',
        'No placement groups.',
        groups.map(group => groupRow(group, state))
      )
    );
  }

  private _renderBanner(state: IClusterState): void {
    if (state.connection === 'connected') {
      this._banner.hidden = true;
      this._banner.replaceChildren();
      return;
    }
    this._banner.hidden = false;
    if (state.connection === 'connecting' && state.head === null) {
      this._banner.className = 'nbc-banner nbc-banner-connecting';
      this._banner.replaceChildren('Connecting to the cluster…');
      return;
    }
    // Lost a connection we had: say so until a snapshot arrives, attempts included.
    this._banner.className = 'nbc-banner nbc-banner-disconnected';
    let next = ' · ';
    if (state.connection === 'connecting') {
      next = ' (trying now) · ';
    } else if (state.retryInMs !== null) {
      next = ` (next try in ${Math.max(1, Math.round(state.retryInMs / 1000))}s) · `;
    }
    const retry = h('button', { class: 'nbc-link', type: 'button' }, 'reconnect now');
    retry.addEventListener('click', () => this._client.reconnectNow());
    this._banner.replaceChildren(h('b', {}, 'Disconnected — reconnecting'), next, retry);
  }

  /** A table of rows under a heading, or a muted line when there are none. */
  private _table(title: string, head: string, empty: string, rows: HTMLElement[]): HTMLElement[] {
    if (rows.length > MAX_ROWS) {
      // Thousands of queued tasks would make every redraw slow; the head has them all.
      const more = rows.length - MAX_ROWS;
      rows = rows.slice(0, MAX_ROWS);
      rows.push(
        h('tr', { class: 'nbc-more' }, h('td', { colspan: '3' }, `… and ${more} more`))
      );
    }
    return [
      h('h3', {}, title),
      rows.length === 0
        ? h('div', { class: 'nbc-muted' }, empty)
        : h(
            'table',
            { class: 'nbc-table' },
            h(
              'thead',
              {},
              h('tr', {}, h('th', {}, head), h('th', {}, 'State'), h('th', {}, ''))
            ),
            h('tbody', {}, ...rows)
          )
    ];
  }

  private _renderTasks(state: IClusterState, connected: boolean): void {
    const tasks = visibleTasks(state);
    this._tasks.replaceChildren(
      ...this._table(
        `Tasks (${tasks.length})`,
        'Task · notebook',
        'No running or queued tasks.',
        cellGroups(tasks).flatMap(group => [
          ...(group.cellId ? [this._cellRow(group, connected)] : []),
          ...group.tasks.map(task => this._taskRow(task, state, connected))
        ])
      )
    );
  }

  /** A cell's header row: which cell, a jump to it, and cancelling all of its tasks. */
  private _cellRow(group: ICellGroup, connected: boolean): HTMLElement {
    const where =
      (group.notebook ? ownerLabel({ job_id: group.jobId, kernel_id: null, notebook: group.notebook }) : 'cell') +
      (group.cellCount !== null ? ` · In [${group.cellCount}]` : '');
    const actions: HTMLElement[] = [];
    const goTo = this._goToCell;
    if (goTo && group.notebook && group.cellId) {
      const notebook = group.notebook;
      const cellId = group.cellId;
      const jump = h(
        'button',
        { class: 'nbc-button', type: 'button', title: `Show the cell in ${notebook}` },
        'Go to cell'
      );
      jump.addEventListener('click', () => {
        goTo(notebook, cellId).catch(err => showErrorMessage('Cannot show the cell', err as Error));
      });
      actions.push(jump);
    }
    const cancel = h(
      'button',
      {
        class: 'nbc-button nbc-danger',
        type: 'button',
        title: `Cancel the ${group.tasks.length} unfinished task(s) of this cell`
      },
      `Cancel cell (${group.tasks.length})`
    ) as HTMLButtonElement;
    cancel.disabled = !connected;
    cancel.addEventListener('click', () => void this._confirmCancelCell(group, where));
    actions.push(cancel);
    return h(
      'tr',
      { class: 'nbc-cell-row', 'data-cell-id': group.cellId ?? '' },
      h('td', { colspan: '2' }, h('div', { class: 'nbc-cell-name' }, where)),
      h('td', { class: 'nbc-action' }, ...actions)
    );
  }

  private async _confirmCancelCell(group: ICellGroup, where: string): Promise<void> {
    const n = group.tasks.length;
    const result = await showDialog({
      title: 'Cancel the cell\'s tasks?',
      body: `Cancel the ${n} unfinished task${n === 1 ? '' : 's'} submitted by ${where}?`,
      buttons: [Dialog.cancelButton({ label: 'Keep' }), Dialog.warnButton({ label: 'Cancel tasks' })]
    });
    if (!result.button.accept || !group.cellId) {
      return;
    }
    try {
      await this._client.cancelCell(group.jobId, group.cellId);
    } catch (err) {
      await showErrorMessage('Cannot cancel the cell\'s tasks', err as Error);
    }
  }

  private _taskRow(task: ITask, state: IClusterState, connected: boolean): HTMLElement {
    const node = task.node_id ? state.nodes[task.node_id] : undefined;
    const owner = ownerLabel(task.owner);
    // An infeasible task says which resource no node has, in place of the node it runs on.
    const sub =
      task.state === 'infeasible'
        ? h(
            'div',
            { class: 'nbc-sub nbc-infeasible' },
            `no node has ${task.missing ?? 'the resources'} · ${owner}`
          )
        : h('div', { class: 'nbc-sub' }, node ? `${owner} · ${node.name}` : owner);
    const cancel = h(
      'button',
      { class: 'nbc-button', type: 'button', title: `Cancel task ${task.task_id}` },
      'Cancel'
    ) as HTMLButtonElement;
    cancel.disabled = !connected;
    cancel.addEventListener('click', () => void this._confirmCancel(task));
    const log =
      task.state === 'running'
        ? this._logButton({ task: task.task_id }, `${task.name} ${task.task_id}`)
        : null;
    return h(
      'tr',
      { 'data-task-id': task.task_id, 'data-state': task.state },
      h(
        'td',
        {
          title:
            `${task.task_id}\n${formatResources(task.resources)}` +
            (task.owner?.notebook ? `\n${task.owner.notebook}` : '') +
            (node ? `\non ${node.name}` : '') +
            (task.started_at ? `\nstarted ${clock(task.started_at)}` : '')
        },
        h('div', { class: 'nbc-name' }, task.name),
        sub
      ),
      h('td', {}, h('span', { class: `nbc-badge nbc-task-${task.state}` }, task.state)),
      h('td', { class: 'nbc-action' }, log, cancel)
    );
  }

  private _renderActors(state: IClusterState, connected: boolean): void {
    const actors = visibleActors(state);
    const live = actors.filter(a => a.state !== 'dead').length;
    this._actors.replaceChildren(
      ...this._table(
        `Actors (${live})`,
        'Actor · notebook',
        'No actors.',
        actors.map(actor => this._actorRow(actor, state, connected))
      )
    );
  }

  private _actorRow(actor: IActor, state: IClusterState, connected: boolean): HTMLElement {
    const node = actor.node_id ? state.nodes[actor.node_id] : undefined;
    const label = actor.name ? `${actor.class_name} "${actor.name}"` : actor.class_name;
    const owner = ownerLabel(actor.owner);
    let action: Child = null;
    if (actor.state !== 'dead') {
      const kill = h(
        'button',
        { class: 'nbc-button nbc-danger', type: 'button', title: `Kill actor ${actor.actor_id}` },
        'Kill'
      ) as HTMLButtonElement;
      kill.disabled = !connected;
      kill.addEventListener('click', () => void this._confirmKill(actor, label));
      action = kill;
    }
    return h(
      'tr',
      { 'data-actor-id': actor.actor_id, 'data-state': actor.state },
      h(
        'td',
        {
          title:
            `${actor.actor_id}\n${formatResources(actor.resources)}` +
            (actor.owner?.notebook ? `\n${actor.owner.notebook}` : '') +
            (node ? `\non ${node.name}` : '') +
            (actor.pid ? ` (pid ${actor.pid})` : '') +
            (actor.detached ? '\ndetached' : '')
        },
        h('div', { class: 'nbc-name' }, label),
        h(
          'div',
          { class: 'nbc-sub' },
          [owner, node?.name, actor.detached ? 'detached' : ''].filter(Boolean).join(' · ')
        )
      ),
      h('td', {}, h('span', { class: `nbc-badge nbc-actor-${actor.state}` }, actor.state)),
      h(
        'td',
        { class: 'nbc-action' },
        actor.node_id || actor.state === 'dead' ? this._logButton({ actor: actor.actor_id }, label) : null,
        action
      )
    );
  }

  /** A "Log" button opening that log in the main area (none when the panel cannot open one). */
  private _logButton(target: ILogTarget, label: string): HTMLElement | null {
    if (!this._open) {
      return null;
    }
    const button = h(
      'button',
      { class: 'nbc-button', type: 'button', title: `Open the log of ${label}` },
      'Log'
    );
    button.addEventListener('click', () => {
      const open = this._open;
      if (open) {
        open(new LogViewer(target, label, (t, offset) => this._client.readLog(t, offset)));
      }
    });
    return button;
  }

  private async _confirmCancel(task: ITask): Promise<void> {
    const result = await showDialog({
      title: 'Cancel task?',
      body: `Cancel ${task.name} (${task.task_id}) from ${ownerLabel(task.owner)}?`,
      buttons: [Dialog.cancelButton({ label: 'Keep' }), Dialog.warnButton({ label: 'Cancel task' })]
    });
    if (!result.button.accept) {
      return;
    }
    try {
      await this._client.cancelTask(task.task_id);
    } catch (err) {
      await showErrorMessage('Cannot cancel the task', err as Error);
    }
  }

  private async _confirmKill(actor: IActor, label: string): Promise<void> {
    const result = await showDialog({
      title: 'Kill actor?',
      body:
        `Kill ${label} owned by ${ownerLabel(actor.owner)}? ` +
        'Its state is lost and pending calls fail.',
      buttons: [Dialog.cancelButton({ label: 'Keep' }), Dialog.warnButton({ label: 'Kill' })]
    });
    if (!result.button.accept) {
      return;
    }
    try {
      await this._client.killActor(actor.actor_id);
    } catch (err) {
      await showErrorMessage('Cannot kill the actor', err as Error);
    }
  }

  private _client: ClusterClient;
  private _open: OpenWidget | null;
  private _goToCell: GoToCell | null;
  private _banner: HTMLElement;
  private _summary: HTMLElement;
  private _nodes: HTMLElement;
  private _tasks: HTMLElement;
  private _actors: HTMLElement;
  private _frame: number | null = null;
  private _groups: HTMLElement;
  private _tablesKey = '';
  private _groupsKey = '';
  private _pools = new PoolsSection();
  private _memory = new MemorySection();
  private _timeline: TimelineSection;
}

/** Node names by id, for the timeline's lanes. */
export function nodeNames(state: IClusterState): Record<string, string> {
  const out: Record<string, string> = {};
  for (const id of state.nodeOrder) {
    out[id] = state.nodes[id]?.name ?? id;
  }
  return out;
}
