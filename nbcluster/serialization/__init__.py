"""cloudpickle with pickle protocol 5 out-of-band buffers."""

from nbcluster.serialization.pickling import (
    DepMarker,
    dumps,
    dumps_args,
    loads,
    loads_args,
)

__all__ = ["DepMarker", "dumps", "dumps_args", "loads", "loads_args"]
