import { describe, expect, it } from 'vitest';

import { ServerConnection } from '@jupyterlab/services';

import { eventsUrl } from '../src/client';

describe('eventsUrl', () => {
  it('lives under the server base_url on the websocket origin', () => {
    const settings = ServerConnection.makeSettings({
      baseUrl: 'http://hub.example:8000/user/alice/',
      wsUrl: 'ws://hub.example:8000/user/alice/',
      token: '',
      appendToken: false
    });
    expect(eventsUrl(settings)).toBe('ws://hub.example:8000/user/alice/nbcluster/api/events');
  });

  it('appends the token only when the settings say so', () => {
    const base = {
      baseUrl: 'http://localhost:8888/',
      wsUrl: 'ws://localhost:8888/',
      token: 'a b&c'
    };
    const withToken = ServerConnection.makeSettings({ ...base, appendToken: true });
    expect(eventsUrl(withToken)).toBe('ws://localhost:8888/nbcluster/api/events?token=a%20b%26c');
    const cookieOnly = ServerConnection.makeSettings({ ...base, appendToken: false });
    expect(eventsUrl(cookieOnly)).toBe('ws://localhost:8888/nbcluster/api/events');
  });
});
