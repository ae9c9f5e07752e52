import { describe, expect, it } from 'vitest';

import { appendLines, logQuery } from '../src/logsModel';

describe('log viewer helpers', () => {
  it('appends whole lines and keeps the newest', () => {
    expect(appendLines([], 'a\nb\n')).toEqual(['a', 'b']);
    expect(appendLines(['a'], 'b\nc\n', 2)).toEqual(['b', 'c']);
    expect(appendLines(['a'], 'b', 5)).toEqual(['a', 'b']);
  });

  it('names exactly one target in the query', () => {
    expect(logQuery({ actor: 'a b' }, -1)).toBe('actor=a%20b&offset=-1');
    expect(logQuery({ task: 't.1' }, 10)).toBe('task=t.1&offset=10');
    expect(logQuery({ worker: 'n-w1' }, 0)).toBe('worker=n-w1&offset=0');
  });
});
