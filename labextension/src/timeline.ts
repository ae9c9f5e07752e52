/**
 * The "Timeline" view: tasks and actor calls as they ran, one lane per worker
 * grouped by node, each span coloured by function with its phases shaded
 * (argument fetch darker, result store lighter; a failed one outlined red).
 * Hover shows a tooltip (the span's queueing drawn as a dashed line), a click
 * the details. The wheel zooms around the pointer, dragging pans, a double
 * click fits everything again; "Live" follows new spans. Spans come from
 * `GET nbcluster/api/timeline?since=N`, read every second while shown.
 *
 * Drawn on one canvas, coalesced to one draw per animation frame; per lane
 * only the spans in the window are visited (binary search), and spans
 * thinner than a pixel share one pixel column.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

import { el, PollingSection } from './section';
import {
  colorFor,
  firstVisible,
  fit,
  ILane,
  IWindow,
  longestSpan,
  niceStep,
  pan,
  parseTimeline,
  phaseRects,
  spanAt,
  spanLines,
  spanStart,
  tickLabel,
  TimelineData,
  toTime,
  toX,
  zoom
} from './timelineModel';
import type { ISpan } from './views.gen';

const API = 'nbcluster/api';
const LABEL_W = 96;
const ROW_H = 16;
const AXIS_H = 18;
const GROUP_GAP = 6;
/** The User Timing measure of each draw. */
export const PAINT_MEASURE = 'nbc-timeline-paint';

/** The timeline section; `node` goes into the panel or a main-area tab. */
export class TimelineSection extends PollingSection {
  constructor(
    options: {
      settings?: ServerConnection.ISettings;
      nodeNames?: () => Record<string, string>;
      periodMs?: number;
      /** Lane area height limit in pixels (the side panel's is small); 0: none. */
      maxHeight?: number;
      /** Shows an "Open in a tab" button that calls this. */
      openTab?: () => void;
    } = {}
  ) {
    super(
      'nbc-timeline',
      options.settings ?? ServerConnection.makeSettings(),
      options.periodMs ?? 1000
    );
    this._nodeNames = options.nodeNames ?? (() => ({}));
    this._maxHeight = options.maxHeight ?? 0;
    this._summary = el('span', 'nbc-timeline-summary');
    this._live = el('button', 'nbc-button nbc-timeline-live', 'Live') as HTMLButtonElement;
    this._live.type = 'button';
    this._live.title = 'Follow new tasks (double-click the timeline to fit)';
    this._live.addEventListener('click', () => this._setLive(true));
    const fitButton = el('button', 'nbc-button', 'Fit') as HTMLButtonElement;
    fitButton.type = 'button';
    fitButton.title = 'Show every span held';
    fitButton.addEventListener('click', () => this._fitAll());
    const tools = el('div', 'nbc-timeline-tools', this._summary, this._live, fitButton);
    if (options.openTab) {
      const open = el('button', 'nbc-button', 'Open in a tab') as HTMLButtonElement;
      open.type = 'button';
      open.addEventListener('click', options.openTab);
      tools.append(open);
    }
    this._canvas = document.createElement('canvas');
    this._canvas.className = 'nbc-timeline-canvas';
    this._canvas.setAttribute('role', 'img');
    this._canvas.setAttribute('aria-label', 'Task timeline');
    this._scroller = el('div', 'nbc-timeline-scroll', this._canvas);
    if (this._maxHeight) {
      this._scroller.style.maxHeight = `${this._maxHeight}px`;
    }
    this._tooltip = el('div', 'nbc-timeline-tooltip');
    this._tooltip.hidden = true;
    this._details = el('pre', 'nbc-timeline-details');
    this._details.hidden = true;
    this._empty = el('div', 'nbc-muted', 'No tasks have run yet.');
    this.node.append(
      el('h3', '', 'Timeline'),
      tools,
      this._empty,
      this._scroller,
      this._tooltip,
      this._details
    );
    this._listen();
    this._setLive(true);
  }

  /** The data drawn (tests and the tab read it). */
  get data(): TimelineData {
    return this._data;
  }

  /** Read now and every period (idempotent), and draw. */
  start(): void {
    super.start();
    this.draw();
  }

  dispose(): void {
    if (this._frame !== null) {
      cancelAnimationFrame(this._frame);
    }
    super.dispose();
  }

  async refresh(): Promise<void> {
    if (this._busy) {
      return; // the last answer is still being read
    }
    this._busy = true;
    try {
      const url = URLExt.join(this.settings.baseUrl, API, 'timeline') + `?since=${this._data.next}`;
      const response = await ServerConnection.makeRequest(url, {}, this.settings);
      if (!response.ok) {
        return;
      }
      const body = parseTimeline(await response.json());
      if (body !== null) {
        this._data.setNodeNames(this._nodeNames());
        if (this._data.merge(body) || this._data.size === 0) {
          this._longest.clear();
          if (this._liveOn) {
            this._followLive();
          }
          this.draw();
        }
      }
    } catch {
      // the server is away: the connection banner says so
    } finally {
      this._busy = false;
    }
  }

  /** Redraw at the next animation frame (coalesced). */
  draw(): void {
    if (this._frame === null) {
      this._frame = requestAnimationFrame(() => {
        this._frame = null;
        const start = performance.now();
        this._paint();
        // Each draw's cost as a User Timing measure (devtools show it; the browser test reads
        // it), kept bounded.
        if (++this._measures > 1000) {
          performance.clearMeasures(PAINT_MEASURE);
          this._measures = 1;
        }
        performance.measure(PAINT_MEASURE, { start, end: performance.now() });
      });
    }
  }

  // ------------------------------------------------------------------ window
  private _setLive(on: boolean): void {
    this._liveOn = on;
    this._live.classList.toggle('nbc-active', on);
    this._live.setAttribute('aria-pressed', String(on));
    if (on) {
      this._followLive();
      this.draw();
    }
  }

  private _followLive(): void {
    const extent = this._data.extent;
    if (extent !== null) {
      this._window = fit(extent);
    }
  }

  private _fitAll(): void {
    this._setLive(false);
    const extent = this._data.extent;
    if (extent !== null) {
      this._window = fit(extent);
    }
    this.draw();
  }

  private _userMoved(w: IWindow): void {
    this._setLive(false);
    this._window = w;
    this.draw();
  }

  // ------------------------------------------------------------------ input
  private _listen(): void {
    const c = this._canvas;
    c.addEventListener(
      'wheel',
      ev => {
        const w = this._window;
        const width = this._plotWidth();
        if (w === null || width <= 0) {
          return;
        }
        ev.preventDefault();
        const x = ev.offsetX - LABEL_W;
        if (ev.shiftKey || Math.abs(ev.deltaX) > Math.abs(ev.deltaY)) {
          const d = ev.shiftKey ? ev.deltaY : ev.deltaX;
          this._userMoved(pan(w, (d / width) * (w.t1 - w.t0)));
        } else {
          const at = toTime(Math.max(0, x), w, width);
          this._userMoved(zoom(w, Math.exp(ev.deltaY * 0.002), at));
        }
      },
      { passive: false }
    );
    c.addEventListener('mousedown', ev => {
      this._drag = { x: ev.clientX, window: this._window, moved: false };
    });
    window.addEventListener('mouseup', () => {
      this._drag = null;
    });
    c.addEventListener('mousemove', ev => {
      const drag = this._drag;
      if (drag !== null && drag.window !== null && (ev.buttons & 1) === 1) {
        const dx = ev.clientX - drag.x;
        if (Math.abs(dx) > 2 || drag.moved) {
          drag.moved = true;
          const w = drag.window;
          this._userMoved(pan(w, (-dx / this._plotWidth()) * (w.t1 - w.t0)));
          this._hover(null, 0, 0);
          return;
        }
      }
      this._hover(this._hit(ev.offsetX, ev.offsetY), ev.offsetX, ev.offsetY);
    });
    c.addEventListener('mouseleave', () => this._hover(null, 0, 0));
    c.addEventListener('click', ev => {
      if (this._drag?.moved) {
        return;
      }
      const s = this._hit(ev.offsetX, ev.offsetY);
      this._selected = s;
      this._details.hidden = s === null;
      this._details.textContent = s ? this._lines(s).join('\n') : '';
      this.draw();
    });
    c.addEventListener('dblclick', () => this._setLive(true));
  }

  private _lines(s: ISpan): string[] {
    return spanLines(s, this._nodeNames()[s.node_id] ?? s.node_id);
  }

  private _hover(s: ISpan | null, x: number, y: number): void {
    if (s === this._hovered) {
      if (s !== null) {
        this._placeTooltip(x, y);
      }
      return;
    }
    this._hovered = s;
    this._tooltip.hidden = s === null;
    if (s !== null) {
      this._tooltip.textContent = this._lines(s).join('\n');
      this._placeTooltip(x, y);
    }
    this.draw();
  }

  private _placeTooltip(x: number, y: number): void {
    const left = this._canvas.offsetLeft + x + 12;
    const top = this._scroller.offsetTop - this._scroller.scrollTop + y + 12;
    this._tooltip.style.left = `${Math.min(left, this.node.clientWidth - 220)}px`;
    this._tooltip.style.top = `${top}px`;
  }

  /** The span under canvas point (x, y), if any. */
  private _hit(x: number, y: number): ISpan | null {
    const w = this._window;
    const width = this._plotWidth();
    if (w === null || x < LABEL_W || width <= 0) {
      return null;
    }
    for (const [lane, top] of this._laneTops) {
      if (y >= top && y < top + ROW_H) {
        const t = toTime(x - LABEL_W, w, width);
        const slack = (3 / width) * (w.t1 - w.t0); // 3 px either side
        return spanAt(lane, t, slack, this._longestOf(lane));
      }
    }
    return null;
  }

  // ------------------------------------------------------------------ drawing
  private _plotWidth(): number {
    return this._canvas.clientWidth - LABEL_W;
  }

  private _longestOf(lane: ILane): number {
    let m = this._longest.get(lane.key);
    if (m === undefined) {
      m = longestSpan(lane.spans);
      this._longest.set(lane.key, m);
    }
    return m;
  }

  private _paint(): void {
    const data = this._data;
    const lanes = data.lanes;
    const extent = data.extent;
    this._empty.hidden = extent !== null;
    this._scroller.hidden = extent === null;
    const held = data.size;
    this._summary.textContent = held
      ? `${held} span${held === 1 ? '' : 's'} · ${lanes.length} worker${lanes.length === 1 ? '' : 's'}`
      : '';
    this._canvas.dataset.spans = String(held);
    this._canvas.dataset.lanes = String(lanes.length);
    if (extent === null) {
      return;
    }
    if (this._window === null) {
      this._window = fit(extent);
    }
    const w = this._window;
    const groups = lanes.length ? lanes[lanes.length - 1].group + 1 : 0;
    const cssH = AXIS_H + lanes.length * ROW_H + Math.max(0, groups - 1) * GROUP_GAP + 2;
    const cssW = Math.max(LABEL_W + 50, this._scroller.clientWidth);
    const dpr = window.devicePixelRatio || 1;
    const c = this._canvas;
    if (c.width !== Math.round(cssW * dpr) || c.height !== Math.round(cssH * dpr)) {
      c.width = Math.round(cssW * dpr);
      c.height = Math.round(cssH * dpr);
      c.style.width = `${cssW}px`;
      c.style.height = `${cssH}px`;
    }
    const ctx = c.getContext('2d');
    if (ctx === null) {
      return;
    }
    const style = getComputedStyle(this.node);
    const fg = style.getPropertyValue('--jp-ui-font-color1').trim() || '#222';
    const muted = style.getPropertyValue('--jp-ui-font-color2').trim() || '#777';
    const grid = style.getPropertyValue('--jp-border-color2').trim() || '#ddd';
    const error = style.getPropertyValue('--jp-error-color1').trim() || '#d32f2f';
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.font = '10px var(--jp-ui-font-family, sans-serif)';
    ctx.textBaseline = 'middle';
    const width = cssW - LABEL_W;
    // Axis: offsets from the first span held.
    const step = niceStep(((w.t1 - w.t0) / width) * 90);
    ctx.fillStyle = muted;
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    for (let t = Math.ceil(w.t0 / step) * step; t <= w.t1; t += step) {
      const x = LABEL_W + Math.round(toX(t, w, width)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(x, AXIS_H - 4);
      ctx.lineTo(x, cssH);
      ctx.stroke();
      ctx.fillText(tickLabel(t - extent.t0, step), x + 2, AXIS_H / 2);
    }
    this._laneTops = [];
    let group = 0;
    let y = AXIS_H;
    for (const lane of lanes) {
      if (lane.group !== group) {
        group = lane.group;
        y += GROUP_GAP;
        ctx.strokeStyle = grid;
        ctx.beginPath();
        ctx.moveTo(0, y - GROUP_GAP / 2);
        ctx.lineTo(cssW, y - GROUP_GAP / 2);
        ctx.stroke();
      }
      this._laneTops.push([lane, y]);
      ctx.save();
      ctx.beginPath();
      ctx.rect(LABEL_W, y, width, ROW_H);
      ctx.clip();
      this._paintLane(ctx, lane, w, width, y, error);
      ctx.restore();
      ctx.fillStyle = fg;
      ctx.fillText(data.laneLabel(lane).slice(0, 18), 4, y + ROW_H / 2);
      y += ROW_H;
    }
    for (const s of [this._selected, this._hovered]) {
      if (s !== null) {
        this._paintHighlight(ctx, s, w, width, fg);
      }
    }
  }

  private _paintLane(
    ctx: CanvasRenderingContext2D,
    lane: ILane,
    w: IWindow,
    width: number,
    y: number,
    error: string
  ): void {
    const spans = lane.spans;
    const h = ROW_H - 3;
    const top = y + 1;
    let lastPx = -1;
    for (let i = firstVisible(spans, w.t0, this._longestOf(lane)); i < spans.length; i++) {
      const s = spans[i];
      if (spanStart(s) > w.t1) {
        break;
      }
      const rects = phaseRects(s, w, width);
      const x0 = LABEL_W + rects[0][0];
      const last = rects[rects.length - 1];
      const x1 = LABEL_W + last[0] + last[1];
      const failed = s.state !== 'finished';
      ctx.fillStyle = colorFor(s.name);
      if (x1 - x0 < 1) {
        // Thinner than a pixel: one column for all of them.
        const px = Math.floor(x0);
        if (px === lastPx) {
          continue;
        }
        lastPx = px;
        ctx.fillRect(px, top, 1, h);
        continue;
      }
      lastPx = Math.floor(x1);
      ctx.fillRect(x0, top, x1 - x0, h);
      if (rects.length === 3) {
        // Phases: argument fetch shaded darker, result store lighter.
        const [fetch, , store] = rects;
        if (fetch[1] >= 1) {
          ctx.fillStyle = 'rgba(0, 0, 0, 0.35)';
          ctx.fillRect(LABEL_W + fetch[0], top, fetch[1], h);
        }
        if (store[1] >= 1) {
          ctx.fillStyle = 'rgba(255, 255, 255, 0.5)';
          ctx.fillRect(LABEL_W + store[0], top, store[1], h);
        }
      }
      if (failed) {
        ctx.strokeStyle = error;
        ctx.lineWidth = 1.5;
        ctx.strokeRect(x0 + 0.75, top + 0.75, Math.max(0.5, x1 - x0 - 1.5), h - 1.5);
      }
    }
  }

  /** Outline a span and draw its queueing (submitted → started) as a dashed line. */
  private _paintHighlight(
    ctx: CanvasRenderingContext2D,
    s: ISpan,
    w: IWindow,
    width: number,
    fg: string
  ): void {
    const key = `${s.node_id}/${s.worker_id}`;
    const entry = this._laneTops.find(([lane]) => lane.key === key);
    if (entry === undefined) {
      return;
    }
    const y = entry[1];
    const rects = phaseRects(s, w, width);
    const x0 = LABEL_W + rects[0][0];
    const last = rects[rects.length - 1];
    const x1 = LABEL_W + last[0] + last[1];
    ctx.save();
    ctx.beginPath();
    ctx.rect(LABEL_W, 0, width, this._canvas.height);
    ctx.clip();
    ctx.strokeStyle = fg;
    ctx.lineWidth = 1.5;
    ctx.strokeRect(x0 - 1, y, Math.max(2, x1 - x0 + 2), ROW_H - 1);
    const xs = LABEL_W + toX(s.submitted_at, w, width);
    if (xs < x0 - 1) {
      ctx.setLineDash([3, 3]);
      ctx.beginPath();
      ctx.moveTo(xs, y + ROW_H / 2);
      ctx.lineTo(x0 - 1, y + ROW_H / 2);
      ctx.stroke();
    }
    ctx.restore();
  }

  private _nodeNames: () => Record<string, string>;
  private _maxHeight: number;
  private _frame: number | null = null;
  private _busy = false;
  private _measures = 0;
  private _data = new TimelineData();
  private _window: IWindow | null = null;
  private _liveOn = true;
  private _longest = new Map<string, number>();
  private _laneTops: [ILane, number][] = [];
  private _hovered: ISpan | null = null;
  private _selected: ISpan | null = null;
  private _drag: { x: number; window: IWindow | null; moved: boolean } | null = null;
  private _canvas: HTMLCanvasElement;
  private _scroller: HTMLElement;
  private _summary: HTMLElement;
  private _live: HTMLButtonElement;
  private _tooltip: HTMLElement;
  private _details: HTMLElement;
  private _empty: HTMLElement;
}

/** The timeline in a main-area tab (wide): reads while shown. */
export class TimelineWidget extends Widget {
  constructor(nodeNames: () => Record<string, string>) {
    super();
    this.addClass('nbc-panel');
    this.addClass('nbc-timeline-tab');
    this.section = new TimelineSection({ nodeNames });
    this.node.append(this.section.node);
  }

  readonly section: TimelineSection;

  protected onAfterShow(): void {
    this.section.start();
  }

  protected onAfterHide(): void {
    this.section.stop();
  }

  protected onResize(): void {
    this.section.draw();
  }

  dispose(): void {
    this.section.dispose();
    super.dispose();
  }
}
