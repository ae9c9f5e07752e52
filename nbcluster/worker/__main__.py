"""``python -m nbcluster.worker`` (started by the node agent only)."""

from nbcluster.worker.main import main

main()
