/**
 * The panel's "Pools" section: the server's pools (`c.NbclusterApp.pools`:
 * Slurm jobs, SSH hosts, pods), each job with its scheduler id, state, node
 * and why it failed, and a scale control that asks for confirmation. Its data
 * comes from `GET nbcluster/api/pools`, read every few seconds while the
 * panel is shown; scaling is `POST nbcluster/api/pools/{name}/scale`.
 * Self-contained: its types are in `poolsModel.ts`, its DOM helper is its own.
 */

import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { el, PollingSection } from './section';
import { IPool, parsePools, poolSummary, visibleJobs } from './poolsModel';

const API = 'nbcluster/api';

/** The section; `node` goes into the panel, hidden while the server has no pools. */
export class PoolsSection extends PollingSection {
  constructor(
    settings: ServerConnection.ISettings = ServerConnection.makeSettings(),
    periodMs = 3000
  ) {
    super('nbc-pools', settings, periodMs);
    this.node.hidden = true;
  }

  async refresh(): Promise<void> {
    const url = URLExt.join(this.settings.baseUrl, API, 'pools');
    try {
      const response = await ServerConnection.makeRequest(url, {}, this.settings);
      if (!response.ok) {
        return; // no head (503) or not allowed (403): nothing to show
      }
      this.render(parsePools(await response.json()));
    } catch {
      // the server is away: the connection banner says so
    }
  }

  render(pools: IPool[]): void {
    this.node.hidden = pools.length === 0;
    this.node.replaceChildren(el('h3', '', 'Pools'), ...pools.map(p => this._pool(p)));
  }

  private _pool(pool: IPool): HTMLElement {
    const input = document.createElement('input');
    input.type = 'number';
    input.min = '0';
    input.value = String((pool.counts.running ?? 0) + (pool.counts.pending ?? 0));
    input.className = 'nbc-pool-n';
    input.setAttribute('aria-label', `jobs of pool ${pool.name}`);
    const button = el('button', 'jp-mod-styled nbc-pool-scale', 'Scale');
    button.addEventListener('click', () => void this._confirmScale(pool, Number(input.value)));
    const rows = visibleJobs(pool).map(j =>
      el(
        'tr',
        `nbc-job nbc-job-${j.state}`,
        el('td', '', j.job_id),
        el('td', '', j.state),
        el('td', '', j.node_id ?? ''),
        el('td', '', j.host),
        el('td', 'nbc-job-reason', j.reason, j.log_tail ? el('pre', '', j.log_tail) : '')
      )
    );
    const head = el(
      'tr',
      '',
      ...['job', 'state', 'node', 'host', 'reason'].map(t => el('th', '', t))
    );
    return el(
      'div',
      'nbc-pool',
      el('div', 'nbc-pool-title', `${pool.name} (${pool.kind}) `, el('span', '', poolSummary(pool))),
      pool.describe ? el('div', 'nbc-pool-describe', pool.describe) : '',
      el('div', 'nbc-pool-control', input, button),
      rows.length ? el('table', 'nbc-table', head, ...rows) : el('div', 'nbc-empty', 'no jobs')
    );
  }

  private async _confirmScale(pool: IPool, n: number): Promise<void> {
    if (!Number.isInteger(n) || n < 0) {
      await showErrorMessage('Cannot scale the pool', `${n} is not a number of jobs`);
      return;
    }
    const result = await showDialog({
      title: 'Scale pool?',
      body:
        n === 0
          ? `End every job of ${pool.name}? Their nodes drain first.`
          : `Have ${n} job(s) in ${pool.name} (${pool.kind})? Extra nodes drain before they go.`,
      buttons: [Dialog.cancelButton({ label: 'Keep' }), Dialog.okButton({ label: 'Scale' })]
    });
    if (!result.button.accept) {
      return;
    }
    const url = URLExt.join(this.settings.baseUrl, API, 'pools', encodeURIComponent(pool.name), 'scale');
    const response = await ServerConnection.makeRequest(
      url,
      { method: 'POST', body: JSON.stringify({ n }) },
      this.settings
    );
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        message = ((await response.json()) as { error?: string }).error ?? message;
      } catch {
        // not JSON
      }
      await showErrorMessage('Cannot scale the pool', message);
    }
    await this.refresh();
  }

}
