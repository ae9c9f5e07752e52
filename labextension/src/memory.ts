/**
 * The panel's "Memory" section: what the nodes' object stores hold, largest
 * first, with each object's size, owner (notebook), node and state (in memory,
 * spilled, being written; the tooltip says how many processes map it), like
 * `nbcluster memory`. Its data comes from
 * `GET nbcluster/api/memory?limit=N`, read every few seconds while the panel is
 * shown (each read asks every node's agent, so not every second).
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { el, PollingSection } from './section';
import { formatBytes, ownerLabel } from './format';
import { IMemoryBody, memorySummary, parseMemory, shortObjectId } from './memoryModel';

const API = 'nbcluster/api';

/** The section; `node` goes into the panel. */
export class MemorySection extends PollingSection {
  constructor(
    settings: ServerConnection.ISettings = ServerConnection.makeSettings(),
    periodMs = 5000,
    limit = 20
  ) {
    super('nbc-memory', settings, periodMs);
    this._limit = limit;
    this.node.hidden = true;
  }

  async refresh(): Promise<void> {
    const url = URLExt.join(this.settings.baseUrl, API, 'memory') + `?limit=${this._limit}`;
    try {
      const response = await ServerConnection.makeRequest(url, {}, this.settings);
      if (!response.ok) {
        return; // no head (503) or not allowed (403): nothing to show
      }
      const body = parseMemory(await response.json());
      if (body) {
        this.render(body);
      }
    } catch {
      // the server is away: the connection banner says so
    }
  }

  render(body: IMemoryBody): void {
    this.node.hidden = body.nodes.length === 0;
    const head = el(
      'tr',
      '',
      ...['object', 'size', 'owner', 'where'].map(t => el('th', '', t))
    );
    const rows = body.objects.map(o => {
      const id = el('td', 'nbc-object-id', shortObjectId(o.object_id));
      id.title = o.object_id;
      const owner = el('td', 'nbc-object-owner', ownerLabel(o.owner));
      owner.title = o.owner.notebook ?? o.owner.job_id;
      const where = el(
        'td',
        '',
        `${o.node_name} · `,
        el('span', 'nbc-object-state', o.state.replace('_', ' '))
      );
      where.title = `node ${o.node_id}; mapped by ${o.pins} process(es) now`;
      return el(
        'tr',
        `nbc-object nbc-object-${o.state}`,
        id,
        el('td', 'nbc-num', formatBytes(o.size)),
        owner,
        where
      );
    });
    this.node.replaceChildren(
      el('h3', '', 'Memory'),
      el('div', 'nbc-memory-summary', memorySummary(body)),
      rows.length
        ? el('table', 'nbc-table', head, ...rows)
        : el('div', 'nbc-empty', 'no stored objects (values up to 100 KiB travel inline)')
    );
  }

  private _limit: number;
}
