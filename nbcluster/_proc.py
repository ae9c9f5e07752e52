"""Small process helpers shared by the head, agent and worker entry points."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import psutil


def setup_logging(role: str) -> None:
    """Log to stderr with the role in each line (the launcher captures it to a file)."""
    level = os.environ.get("NBCLUSTER_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


async def watch_parent(pid: int, on_gone: asyncio.Event, interval: float = 0.5) -> None:
    """Set ``on_gone`` when process ``pid`` no longer exists (our launcher died)."""
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
    except psutil.Error:
        on_gone.set()
        return
    while True:
        await asyncio.sleep(interval)
        try:
            alive = proc.is_running() and proc.create_time() == created
            if alive and proc.status() == psutil.STATUS_ZOMBIE:
                alive = False
        except psutil.Error:
            alive = False
        if not alive:
            on_gone.set()
            return
