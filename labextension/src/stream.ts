/**
 * The websocket to `nbcluster/api/events`, reopened with backoff whenever it
 * closes (server restart, network blip). Free of JupyterLab imports: the
 * socket factory is injected, so the reconnection logic is unit-tested with a
 * fake socket.
 */

import { backoffDelay, DEFAULT_BACKOFF, IBackoffOptions } from './format';
import { parseMessage, ServerMessage } from './model';

/** The part of the DOM WebSocket the stream uses. */
export interface ISocketLike {
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: unknown) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  close(code?: number, reason?: string): void;
}

export interface IStreamCallbacks {
  /** A valid message from the server. */
  onMessage(msg: ServerMessage): void;
  /** The socket opened (`connecting` until the snapshot arrives) or closed. */
  onStatus(status: 'connecting' | 'connected' | 'disconnected', retryInMs: number | null): void;
}

export interface IStreamOptions {
  /** Opens a socket; called again for every reconnection attempt. */
  createSocket: () => ISocketLike;
  backoff?: IBackoffOptions;
  random?: () => number;
  setTimer?: (fn: () => void, ms: number) => unknown;
  clearTimer?: (handle: unknown) => void;
}

/**
 * A self-healing event stream.
 *
 * The attempt counter resets only once a snapshot arrived, so a server that
 * accepts the socket and closes it at once still backs off.
 */
export class EventStream {
  constructor(options: IStreamOptions, callbacks: IStreamCallbacks) {
    this._options = options;
    this._callbacks = callbacks;
  }

  /** Open the socket (no-op if already open or disposed). */
  start(): void {
    if (this._disposed || this._socket) {
      return;
    }
    this._open();
  }

  /** Number of consecutive failed attempts (0 when connected). */
  get attempts(): number {
    return this._attempt;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** Reconnect now instead of waiting for the pending backoff timer. */
  reconnectNow(): void {
    if (this._disposed || this._socket) {
      return;
    }
    this._cancelTimer();
    this._open();
  }

  /** Close for good: no more callbacks, no more attempts. */
  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._cancelTimer();
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      socket.close(1000, 'panel closed');
    }
  }

  private _open(): void {
    let socket: ISocketLike;
    this._callbacks.onStatus('connecting', null);
    try {
      socket = this._options.createSocket();
    } catch (err) {
      console.warn('nbcluster: cannot open the events websocket', err);
      this._scheduleRetry();
      return;
    }
    this._socket = socket;
    socket.onmessage = ev => {
      if (this._socket !== socket) {
        return;
      }
      let data: unknown;
      try {
        data = typeof ev.data === 'string' ? JSON.parse(ev.data) : null;
      } catch {
        data = null;
      }
      const msg = parseMessage(data);
      if (!msg) {
        console.warn('nbcluster: ignoring an unexpected event', ev.data);
        return;
      }
      if (msg.type === 'snapshot') {
        this._attempt = 0;
        this._callbacks.onStatus('connected', null);
      }
      this._callbacks.onMessage(msg);
    };
    // Errors are always followed by a close event, which does the retry.
    socket.onerror = () => undefined;
    socket.onclose = () => {
      if (this._socket !== socket) {
        return;
      }
      this._socket = null;
      this._scheduleRetry();
    };
  }

  private _scheduleRetry(): void {
    if (this._disposed) {
      return;
    }
    const delay = backoffDelay(
      this._attempt,
      this._options.backoff ?? DEFAULT_BACKOFF,
      this._options.random ?? Math.random
    );
    this._attempt += 1;
    this._callbacks.onStatus('disconnected', delay);
    const setTimer = this._options.setTimer ?? ((fn, ms) => setTimeout(fn, ms));
    this._timer = setTimer(() => {
      this._timer = null;
      if (!this._disposed && !this._socket) {
        this._open();
      }
    }, delay);
  }

  private _cancelTimer(): void {
    if (this._timer !== null) {
      const clearTimer =
        this._options.clearTimer ?? (h => clearTimeout(h as ReturnType<typeof setTimeout>));
      clearTimer(this._timer);
      this._timer = null;
    }
  }

  private _options: IStreamOptions;
  private _callbacks: IStreamCallbacks;
  private _socket: ISocketLike | null = null;
  private _timer: unknown = null;
  private _attempt = 0;
  private _disposed = false;
}
