"""citeqa.distributed: index builds split into shards, made in this process or on Ray.

    build_index_sharded(sources, out, cfg, executor=RayExecutor(RayOptions("local")))

``sharded`` plans, merges and swaps the index in; ``ray_engine`` makes the shards on Ray Data
(an optional extra: ``pip install -e '.[ray]'`` in the checkout). The shard format and the
merge live with the rest of the index code (citeqa/retrieval/shards.py, merge.py). See
docs/ray.md.
"""

from citeqa.distributed.ray_engine import RayExecutor, RayOptions
from citeqa.distributed.sharded import (
    Executor,
    InProcessExecutor,
    build_index_sharded,
    default_work_dir,
)

__all__ = [
    "Executor",
    "InProcessExecutor",
    "RayExecutor",
    "RayOptions",
    "build_index_sharded",
    "default_work_dir",
]
