"""citeqa.api: the REST service (FastAPI). Build it with ``create_app(settings)``."""

from citeqa.api.app import create_app, default_pipeline_factory
from citeqa.api.batching import Batcher, BatcherClosedError, QueueFullError
from citeqa.api.deps import PipelineLike
from citeqa.types import AskArgs

__all__ = [
    "AskArgs",
    "Batcher",
    "BatcherClosedError",
    "PipelineLike",
    "QueueFullError",
    "create_app",
    "default_pipeline_factory",
]
