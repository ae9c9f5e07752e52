"""What the Jupyter panel (and its REST API) asks the head to do: cancel a task, kill an actor.

A mixin of :class:`~nbcluster.head.service.HeadService`: the task is cancelled by the driver
that submitted it (``TASK_CANCEL``), the actor killed by the
:class:`~nbcluster.head.actors.ActorDirectory`, as ``nb.cancel`` and ``nb.kill`` would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbcluster.protocol.messages import DEAD, Kind

if TYPE_CHECKING:
    from nbcluster.head.actors import ActorDirectory
    from nbcluster.head.instructions import Instruction
    from nbcluster.head.observe import Observer
    from nbcluster.head.peers import Peer


class PanelActions:
    """``cancel_task`` and ``kill_actor`` for the panel's buttons."""

    actors: ActorDirectory
    observe: Observer
    peers: dict[bytes, Peer]

    async def _send(self, ident: bytes, header: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _run(self, instructions: list[Instruction]) -> None:
        raise NotImplementedError

    async def cancel_task(self, task_id: str, force: bool = False) -> bool:
        """Ask the driver that submitted ``task_id`` to cancel it; ``False`` if not running."""
        t = self.observe.running_task(task_id)
        if t is None or t.client not in self.peers:
            return False
        await self._send(t.client, {"k": Kind.TASK_CANCEL, "tid": task_id, "force": bool(force)})
        return True

    async def kill_actor(self, aid: str) -> bool:
        """Kill an actor for good (no restart); ``False`` if there is no such live actor."""
        a = self.actors.actors.get(aid)
        if a is None or a.state == DEAD:
            return False
        await self._run(self.actors.kill(aid, True, "killed from the Jupyter panel"))
        return True
