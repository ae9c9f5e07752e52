/**
 * The status-bar item: `nbcluster: N nodes · CPUs busy/total · GPUs busy/total`,
 * or the disconnected state. Clicking it opens the side panel.
 */

import { Widget } from '@lumino/widgets';

import { ClusterClient } from './client';
import { summaryText } from './format';
import { IClusterState } from './model';

export class ClusterStatus extends Widget {
  constructor(client: ClusterClient, onClick: () => void) {
    super();
    this._client = client;
    this.addClass('nbc-status');
    this.node.title = 'nbcluster: open the Cluster panel';
    this.node.addEventListener('click', onClick);
    client.changed.connect(this._update, this);
    this._update(client, client.state);
  }

  dispose(): void {
    if (!this.isDisposed) {
      this._client.changed.disconnect(this._update, this);
    }
    super.dispose();
  }

  private _update(_: ClusterClient, state: IClusterState): void {
    const connected = state.connection === 'connected';
    const text =
      state.connection === 'connecting' && state.head === null
        ? 'nbcluster: connecting…'
        : summaryText(state.totals, connected);
    if (this.node.textContent !== text) {
      this.node.textContent = text;
    }
    this.node.dataset.connection = state.connection;
  }

  private _client: ClusterClient;
}
