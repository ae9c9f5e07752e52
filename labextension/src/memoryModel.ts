/**
 * The data of the panel's "Memory" section (`GET nbcluster/api/memory`, typed
 * by the generated views): pure functions, apart from the DOM so they test in
 * plain Node.
 */

import { formatBytes } from './format';
import { IMemoryBody, IMemoryNode, IMemoryObject } from './views.gen';

export type { IMemoryBody, IMemoryNode, IMemoryObject };

/** A `GET nbcluster/api/memory` body, or `null` when it is malformed. */
export function parseMemory(body: unknown): IMemoryBody | null {
  const b = body as Partial<IMemoryBody> | null;
  if (!b || !Array.isArray(b.nodes) || !Array.isArray(b.objects)) {
    return null;
  }
  const objects = b.objects.filter(
    o =>
      typeof o === 'object' &&
      o !== null &&
      typeof o.object_id === 'string' &&
      typeof o.size === 'number' &&
      typeof o.owner === 'object' &&
      o.owner !== null
  );
  const nodes = b.nodes.filter(n => typeof n === 'object' && n !== null && typeof n.name === 'string');
  return { nodes, objects, limit: typeof b.limit === 'number' ? b.limit : objects.length };
}

/** "3 objects · 6.0 MiB in memory · 3.0 MiB spilled" over every node that answered. */
export function memorySummary(body: IMemoryBody): string {
  let objects = 0;
  let used = 0;
  let spilled = 0;
  for (const n of body.nodes) {
    objects += n.objects;
    used += n.used;
    spilled += n.spilled;
  }
  const parts = [`${objects} object${objects === 1 ? '' : 's'}`, `${formatBytes(used)} in memory`];
  if (spilled > 0) {
    parts.push(`${formatBytes(spilled)} spilled`);
  }
  const silent = body.nodes.filter(n => n.error).length;
  if (silent > 0) {
    parts.push(`${silent} node${silent === 1 ? '' : 's'} did not answer`);
  }
  return parts.join(' · ');
}

/** An object id short enough for a table cell (the full id is its tooltip). */
export function shortObjectId(id: string): string {
  // Ids are the hex of an ASCII id padded with zero bytes: the padding says nothing.
  const trimmed = id.replace(/(00)+$/, '');
  return trimmed.length > 8 ? `${trimmed.slice(0, 8)}…` : trimmed;
}
