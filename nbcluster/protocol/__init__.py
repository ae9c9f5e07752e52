"""Wire protocol: message kinds, framing and cluster security."""
