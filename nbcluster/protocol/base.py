"""The base of every message schema (:class:`Message`) and the field types they share.

See :mod:`nbcluster.protocol.schema` for the schemas themselves.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

#: A non-negative integer (sizes, counts).
Count = Annotated[int, msgspec.Meta(ge=0)]
#: A resource shape: resource name -> amount (the head checks the amounts themselves). Not
#: ``float``: an int amount stays an int, as the sender wrote it.
Shape = dict[str, int | float]


class Message(msgspec.Struct, tag_field="k", omit_defaults=True, kw_only=True):
    """Base of every message schema. ``frames`` is the number of payload frames it carries.

    ``None`` means any number; a subclass whose count depends on its fields overrides
    :meth:`frames`.
    """

    frame_count: ClassVar[int | None] = 0
    #: How :meth:`frames` counts, for the docs, where a subclass overrides it.
    frames_doc: ClassVar[str] = ""
    #: Does the sender wait for an answer (so a malformed one is answered with ``ERROR``)?
    expects_reply: ClassVar[bool] = False
    #: One line for docs/protocol.md: direction and purpose.
    summary: ClassVar[str] = ""

    def frames(self) -> int | None:
        """How many payload frames this message must carry (``None``: any number)."""
        return self.frame_count


def _args_frames(nargs: int, deps: list[int], extra: int = 0) -> int:
    return extra + nargs + sum(deps)
