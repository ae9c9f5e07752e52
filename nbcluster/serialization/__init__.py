"""cloudpickle with pickle protocol 5 out-of-band buffers."""

from nbcluster.serialization.pickling import (
    DepMarker,
    copy_frames,
    dumps,
    dumps_args,
    loads,
    loads_args,
    restore_filenames,
)

__all__ = [
    "DepMarker",
    "copy_frames",
    "dumps",
    "dumps_args",
    "loads",
    "loads_args",
    "restore_filenames",
]
