/**
 * A worker's log in the main area: an actor's, a task's (its own lines) or a
 * dead worker's, read from its node through the server
 * (`GET nbcluster/api/logs`) and followed while the worker lives.
 */

import { Widget } from '@lumino/widgets';

import { appendLines, FOLLOW_MS, ILogTarget, logQuery, LogReader } from './logsModel';

export class LogViewer extends Widget {
  constructor(target: ILogTarget, label: string, read: LogReader) {
    super();
    this._target = target;
    this._read = read;
    this.addClass('nbc-log');
    this.id = `nbcluster-log-${logQuery(target, 0).replace(/[^a-zA-Z0-9]/g, '-')}`;
    this.title.label = `Log: ${label}`;
    this.title.closable = true;
    this._status = document.createElement('div');
    this._status.className = 'nbc-log-status';
    this._pre = document.createElement('pre');
    this._pre.className = 'nbc-log-text';
    this.node.append(this._status, this._pre);
    void this._poll();
  }

  dispose(): void {
    if (this._timer !== null) {
      clearTimeout(this._timer);
      this._timer = null;
    }
    super.dispose();
  }

  private async _poll(): Promise<void> {
    this._timer = null;
    if (this.isDisposed) {
      return;
    }
    let alive = true;
    try {
      const body = await this._read(this._target, this._offset);
      this._offset = body.offset;
      alive = body.alive;
      if (body.text) {
        const atBottom =
          this.node.scrollTop + this.node.clientHeight >= this.node.scrollHeight - 4;
        this._lines = appendLines(this._lines, body.text);
        this._pre.textContent = this._lines.join('\n');
        if (atBottom) {
          this.node.scrollTop = this.node.scrollHeight; // follow the end unless scrolled up
        }
      }
      this._status.textContent = `${body.worker_id} on ${body.node_id}` + (alive ? '' : ' · ended');
      this._status.dataset.state = alive ? 'alive' : 'ended';
    } catch (err) {
      this._status.textContent = (err as Error).message;
      this._status.dataset.state = 'error';
      alive = false;
    }
    if (alive && !this.isDisposed) {
      this._timer = window.setTimeout(() => void this._poll(), FOLLOW_MS);
    }
  }

  private _target: ILogTarget;
  private _read: LogReader;
  private _status: HTMLElement;
  private _pre: HTMLElement;
  private _lines: string[] = [];
  private _offset = -1;
  private _timer: number | null = null;
}
