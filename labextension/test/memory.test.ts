import { describe, expect, it } from 'vitest';

import { memorySummary, parseMemory, shortObjectId } from '../src/memoryModel';

const owner = { job_id: 'e8500001', kernel_id: 'k1', notebook: 'work/a.ipynb' };
const body = {
  limit: 20,
  nodes: [
    { node_id: 'n1', name: 'gpu1', capacity: 100, used: 3 * 2 ** 20, spilled: 2 ** 20, objects: 3, listed: 2, error: null },
    { node_id: 'n2', name: 'gpu2', capacity: 100, used: 0, spilled: 0, objects: 0, listed: 0, error: 'no answer within 5 s' }
  ],
  objects: [
    { object_id: '62373666653662613537312e70000000', size: 3 * 2 ** 20, node_id: 'n1', node_name: 'gpu1', state: 'in_memory', pins: 1, owner },
    { object_id: '6237', size: 2 ** 20, node_id: 'n1', node_name: 'gpu1', state: 'spilled', pins: 0, owner },
    { nonsense: true }
  ]
};

describe('memory', () => {
  it('reads the REST body and leaves malformed objects out', () => {
    const m = parseMemory(body);
    expect(m?.objects.map(o => o.state)).toEqual(['in_memory', 'spilled']);
    expect(m?.nodes.length).toBe(2);
    expect(parseMemory(null)).toBeNull();
    expect(parseMemory({ nodes: 'x', objects: [] })).toBeNull();
  });

  it('sums the nodes and names those that did not answer', () => {
    const m = parseMemory(body);
    expect(m && memorySummary(m)).toBe(
      '3 objects · 3.0 MiB in memory · 1.0 MiB spilled · 1 node did not answer'
    );
  });

  it('shortens ids without their zero padding', () => {
    expect(shortObjectId('62373666653662613537312e70000000')).toBe('62373666…');
    expect(shortObjectId('6237000000')).toBe('6237');
  });
});
