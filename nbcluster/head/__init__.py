"""The head: membership, resource accounting and worker leases."""
