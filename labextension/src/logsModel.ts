/**
 * The log viewer's pure parts (no DOM): which log a request names, and the
 * bounded list of lines on screen.
 */

import type { ILogBody } from './views.gen';

/** Which log: exactly one of an actor id, a task id or a worker id. */
export interface ILogTarget {
  actor?: string;
  task?: string;
  worker?: string;
}

/** Reads part of a log (the server's answer), from `offset` on (-1: its end). */
export type LogReader = (target: ILogTarget, offset: number) => Promise<ILogBody>;

/** Lines kept on screen; older ones scroll away. */
export const MAX_LINES = 5000;
/** How often a live worker's log is read again. */
export const FOLLOW_MS = 1000;

/** `lines` with the whole lines of `text` appended, the oldest dropped past `max`. */
export function appendLines(lines: string[], text: string, max: number = MAX_LINES): string[] {
  const added = text.split('\n');
  if (added[added.length - 1] === '') {
    added.pop(); // the text ends with a newline
  }
  const all = lines.concat(added);
  return all.length > max ? all.slice(all.length - max) : all;
}

/** The query string of a target (`actor=…`, `task=…` or `worker=…`). */
export function logQuery(target: ILogTarget, offset: number): string {
  const [key, value] = target.actor
    ? ['actor', target.actor]
    : target.task
      ? ['task', target.task]
      : ['worker', target.worker ?? ''];
  return `${key}=${encodeURIComponent(value)}&offset=${offset}`;
}

