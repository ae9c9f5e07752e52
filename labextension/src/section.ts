/**
 * What the panel's polled sections (Memory, Pools, Timeline) share: their element helper, and a
 * base that reads the server now and every period while the panel is shown.
 */

import { ServerConnection } from '@jupyterlab/services';

/** An element with a class and children. */
export function el(tag: string, cls: string, ...children: (Node | string)[]): HTMLElement {
  const e = document.createElement(tag);
  if (cls) {
    e.className = cls;
  }
  e.append(...children);
  return e;
}

/** A section whose `node` goes into the panel and whose `refresh` reads the server. */
export abstract class PollingSection {
  readonly node: HTMLElement;

  constructor(cls: string, settings: ServerConnection.ISettings, periodMs: number) {
    this.node = el('div', cls);
    this.settings = settings;
    this._periodMs = periodMs;
  }

  /** Read now and every period (idempotent). */
  start(): void {
    if (this._timer === null) {
      void this.refresh();
      this._timer = setInterval(() => void this.refresh(), this._periodMs);
    }
  }

  /** Stop reading (the panel is hidden). */
  stop(): void {
    if (this._timer !== null) {
      clearInterval(this._timer);
      this._timer = null;
    }
  }

  dispose(): void {
    this.stop();
    this.node.remove();
  }

  abstract refresh(): Promise<void>;

  protected readonly settings: ServerConnection.ISettings;
  private _periodMs: number;
  private _timer: ReturnType<typeof setInterval> | null = null;
}
