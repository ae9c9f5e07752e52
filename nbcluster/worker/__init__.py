"""Worker processes: run tasks pushed by the drivers that lease them."""
