/**
 * nbcluster's JupyterLab extension: the "Cluster" side panel and the
 * status-bar summary, both fed by one websocket to the server extension.
 */

import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { MainAreaWidget } from '@jupyterlab/apputils';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { ClusterClient } from './client';
import { ClusterPanel, nodeNames } from './panel';
import { ClusterStatus } from './statusbar';
import { TimelineWidget } from './timeline';

const PLUGIN_ID = 'nbcluster:plugin';
const PANEL_ID = 'nbcluster-panel';
const TIMELINE_ID = 'nbcluster-timeline';
const OPEN_TIMELINE = 'nbcluster:open-timeline';

/** Three stacked nodes: the sidebar tab icon (follows the theme's icon colour). */
export const clusterIcon = new LabIcon({
  name: 'nbcluster:cluster',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">' +
    '<g class="jp-icon3" fill="#616161">' +
    '<rect x="3" y="3" width="18" height="5" rx="1"/>' +
    '<rect x="3" y="9.5" width="18" height="5" rx="1"/>' +
    '<rect x="3" y="16" width="18" height="5" rx="1"/>' +
    '</g><g fill="#fff"><circle cx="6.5" cy="5.5" r="1"/><circle cx="6.5" cy="12" r="1"/>' +
    '<circle cx="6.5" cy="18.5" r="1"/></g></svg>'
});

/**
 * Open a notebook (or bring its tab forward) and make the cell with `cellId` its active cell,
 * scrolled into view. Duck-typed on the notebook widget, so that the extension needs no
 * dependency on the notebook packages.
 */
async function goToCell(app: JupyterFrontEnd, path: string, cellId: string): Promise<void> {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const widget: any = await app.commands.execute('docmanager:open', { path });
  if (!widget) {
    throw new Error(`cannot open ${path}`);
  }
  await widget.context?.ready;
  await widget.revealed;
  app.shell.activateById(widget.id);
  const notebook = widget.content;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const cells: any[] = notebook?.widgets ?? [];
  const index = cells.findIndex(cell => cell.model?.id === cellId);
  if (index < 0) {
    throw new Error(`${path} has no cell ${cellId} (deleted, or another copy of the notebook)`);
  }
  notebook.activeCellIndex = index;
  if (typeof notebook.scrollToItem === 'function') {
    await notebook.scrollToItem(index);
  } else {
    cells[index].node.scrollIntoView({ block: 'center' });
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'nbcluster: live nodes, GPUs, tasks and actors in a side panel and the status bar.',
  autoStart: true,
  optional: [ILayoutRestorer, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    restorer: ILayoutRestorer | null,
    statusBar: IStatusBar | null
  ) => {
    const client = new ClusterClient(ServerConnection.makeSettings());
    let timeline: TimelineWidget | null = null;
    app.commands.addCommand(OPEN_TIMELINE, {
      label: 'nbcluster: Task Timeline',
      execute: () => {
        if (timeline === null || timeline.isDisposed) {
          timeline = new TimelineWidget(() => nodeNames(client.state));
          timeline.id = TIMELINE_ID;
          timeline.title.label = 'Task Timeline';
          timeline.title.icon = clusterIcon;
          timeline.title.closable = true;
          app.shell.add(timeline, 'main');
        }
        app.shell.activateById(TIMELINE_ID);
      }
    });
    const panel = new ClusterPanel(
      client,
      widget => {
        const main = new MainAreaWidget({ content: widget });
        main.id = widget.id;
        main.title.label = widget.title.label;
        main.title.closable = true;
        app.shell.add(main, 'main');
        app.shell.activateById(main.id);
      },
      (notebook, cellId) => goToCell(app, notebook, cellId),
      () => void app.commands.execute(OPEN_TIMELINE)
    );
    panel.id = PANEL_ID;
    panel.title.icon = clusterIcon;
    panel.title.caption = 'Cluster';
    app.shell.add(panel, 'left', { rank: 900 });
    if (restorer) {
      restorer.add(panel, PANEL_ID);
    }
    if (statusBar) {
      const item = new ClusterStatus(client, () => app.shell.activateById(PANEL_ID));
      statusBar.registerStatusItem(PLUGIN_ID, {
        item,
        align: 'left',
        rank: 900,
        isActive: () => true
      });
    }
    client.start();
  }
};

export default plugin;
