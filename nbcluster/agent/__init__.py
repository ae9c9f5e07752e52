"""The node agent: registers a host's resources and supervises its worker processes."""
