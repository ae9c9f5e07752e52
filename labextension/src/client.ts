/**
 * The panel's connection to the server extension: one websocket for live
 * state, REST calls for history and for cancel/kill. Every URL is built from
 * the server's connection settings, so it works under any `base_url`
 * (JupyterHub, proxies).
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import {
  applyMessages,
  IClusterState,
  initialState,
  mergeHistory,
  ServerMessage,
  setConnection
} from './model';
import { EventStream, ISocketLike } from './stream';
import { ILogTarget, logQuery } from './logsModel';
import type { IErrorBody, IHistoriesBody, ILogBody } from './views.gen';

const API = 'nbcluster/api';

/** The websocket URL of the event stream, with the token when the settings want it. */
export function eventsUrl(settings: ServerConnection.ISettings): string {
  let url = URLExt.join(settings.wsUrl, API, 'events');
  if (settings.appendToken && settings.token) {
    url += `?token=${encodeURIComponent(settings.token)}`;
  }
  return url;
}

/** What a failed request says: our IErrorBody, jupyter-server's `message`, else the status. */
async function errorText(response: Response): Promise<string> {
  try {
    const body = (await response.json()) as Partial<IErrorBody> & { message?: string };
    return body.error ?? body.message ?? `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`; // not JSON
  }
}

/** The live cluster state shared by the side panel and the status bar. */
export class ClusterClient {
  constructor(settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {
    this._settings = settings;
    this._stream = new EventStream(
      {
        // The DOM socket's handlers take Event subtypes; the stream only reads `data`.
        createSocket: () => new settings.WebSocket(eventsUrl(settings)) as unknown as ISocketLike
      },
      {
        onMessage: msg => this._onMessage(msg),
        onStatus: (status, retryInMs) => {
          this._flush(); // messages read before the status change come first
          this._update(setConnection(this._state, status, retryInMs));
        }
      }
    );
  }

  /** Emitted after every state change. */
  get changed(): ISignal<this, IClusterState> {
    return this._changed;
  }

  get state(): IClusterState {
    return this._state;
  }

  get isDisposed(): boolean {
    return this._stream.isDisposed;
  }

  /** Open the websocket (idempotent). */
  start(): void {
    this._stream.start();
  }

  /** Skip the backoff wait (the "reconnect now" link). */
  reconnectNow(): void {
    this._stream.reconnectNow();
  }

  dispose(): void {
    if (this._flushTimer !== null) {
      clearTimeout(this._flushTimer);
      this._flushTimer = null;
    }
    this._stream.dispose();
    Signal.clearData(this);
  }

  /** Ask the server to cancel a task; rejects with the server's error text. */
  async cancelTask(taskId: string): Promise<void> {
    await this._post(`tasks/${encodeURIComponent(taskId)}/cancel`);
  }

  /** Ask the server to cancel every unfinished task a notebook cell submitted. */
  async cancelCell(jobId: string, cellId: string): Promise<void> {
    await this._post(
      `jobs/${encodeURIComponent(jobId)}/cells/${encodeURIComponent(cellId)}/cancel`
    );
  }

  /** Ask the server to kill an actor; rejects with the server's error text. */
  async killActor(actorId: string): Promise<void> {
    await this._post(`actors/${encodeURIComponent(actorId)}/kill`);
  }

  /** Part of a worker's log (see logs.ts); rejects with the server's error text. */
  async readLog(target: ILogTarget, offset: number): Promise<ILogBody> {
    const url = URLExt.join(this._settings.baseUrl, API, 'logs') + '?' + logQuery(target, offset);
    const response = await ServerConnection.makeRequest(url, {}, this._settings);
    if (!response.ok) {
      throw new Error(await errorText(response));
    }
    return (await response.json()) as ILogBody;
  }

  private async _post(path: string): Promise<void> {
    const url = URLExt.join(this._settings.baseUrl, API, path);
    const response = await ServerConnection.makeRequest(url, { method: 'POST' }, this._settings);
    if (!response.ok) {
      throw new Error(await errorText(response));
    }
  }

  private async _loadHistory(): Promise<void> {
    const url = URLExt.join(this._settings.baseUrl, API, 'metrics');
    try {
      const response = await ServerConnection.makeRequest(url, {}, this._settings);
      if (!response.ok) {
        return;
      }
      const body = (await response.json()) as Partial<IHistoriesBody>;
      if (body && typeof body.nodes === 'object' && body.nodes !== null) {
        this._update(mergeHistory(this._state, body.nodes));
      }
    } catch (err) {
      // The sparklines then start from live samples only.
      console.warn('nbcluster: cannot load the metrics history', err);
    }
  }

  /** Queue a message; the queue is folded in one go once the burst that brought it is read. */
  private _onMessage(msg: ServerMessage): void {
    this._pending.push(msg);
    if (this._flushTimer === null) {
      this._flushTimer = setTimeout(() => this._flush(), 0);
    }
  }

  private _flush(): void {
    if (this._flushTimer !== null) {
      clearTimeout(this._flushTimer);
      this._flushTimer = null;
    }
    const msgs = this._pending;
    this._pending = [];
    if (this.isDisposed || msgs.length === 0) {
      return;
    }
    this._update(applyMessages(this._state, msgs));
    if (msgs.some(m => m.type === 'snapshot')) {
      void this._loadHistory();
    }
  }

  private _update(state: IClusterState): void {
    this._state = state;
    this._changed.emit(state);
  }

  private _pending: ServerMessage[] = [];
  private _flushTimer: ReturnType<typeof setTimeout> | null = null;
  private _settings: ServerConnection.ISettings;
  private _stream: EventStream;
  private _state: IClusterState = initialState();
  private _changed = new Signal<this, IClusterState>(this);
}
