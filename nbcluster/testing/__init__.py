"""Helpers for testing nbcluster and code that uses it."""
