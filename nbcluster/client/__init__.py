"""The driver-side runtime: a connection to the head, task submission, owned objects."""
