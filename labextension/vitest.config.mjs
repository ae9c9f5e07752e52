import { defineConfig } from 'vitest/config';

// Pure logic only (model, formatting, reconnection): plain Node, no DOM.
export default defineConfig({
  test: { include: ['test/**/*.test.ts'], environment: 'node' }
});
