"""Trained models in the API process: a bounded LRU cache of loaded models, and the
serialized form of an inference session's hidden state.

`ModelCache.get(key, uri)` returns the model of one checkpoint (key: job id, step, sha256),
loading it once through the artifact store, off the event loop (a thread). Concurrent
requests for a model being loaded wait for that one load. At most `size` models stay (the
least recently used goes first): UNROLL_MODEL_CACHE_SIZE.
"""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict
from collections.abc import Callable

import torch

from trainer import checkpoint as ckpt
from trainer.artifact import ArtifactError, read
from trainer.inference import Model

CacheKey = tuple[str, int, str]  # job id, step, sha256


class ModelCache:
    def __init__(self, size: int, read_bytes: Callable[[str], bytes]) -> None:
        self.size = size
        self.read_bytes = read_bytes
        self.models: OrderedDict[CacheKey, Model] = OrderedDict()
        self.loading: dict[CacheKey, asyncio.Future[Model]] = {}
        self.loads = 0  # models loaded so far (tests and metrics)

    async def get(self, key: CacheKey, uri: str) -> Model:
        """The model of checkpoint `key` stored at `uri`; ArtifactError (a ValueError) for a
        checkpoint without what inference needs, FileNotFoundError for a missing file."""
        model = self.models.get(key)
        if model is not None:
            self.models.move_to_end(key)
            return model
        task = self.loading.get(key)
        if task is None:  # one load per key, not tied to the request that started it
            task = asyncio.ensure_future(asyncio.to_thread(self._load, key, uri))
            self.loading[key] = task
            task.add_done_callback(lambda done: self._loaded(key, done))
        return await asyncio.shield(task)

    def _loaded(self, key: CacheKey, task: asyncio.Future[Model]) -> None:
        self.loading.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return  # the next request tries again
        self.models[key] = task.result()
        while len(self.models) > self.size:
            self.models.popitem(last=False)

    def _load(self, key: CacheKey, uri: str) -> Model:
        data = self.read_bytes(uri)
        try:
            state = ckpt.from_bytes(data)
        except Exception as exc:  # torch raises many kinds for bytes that are not a checkpoint
            raise ArtifactError(f"job {key[0]} checkpoint of step {key[1]}: not a checkpoint torch can read safely ({type(exc).__name__})") from None
        self.loads += 1
        return Model(read(state, f"job {key[0]} checkpoint of step {key[1]}"))


def dump_state(state: dict[str, torch.Tensor]) -> bytes:
    """A session's state as bytes (tensors only: loaded back with weights_only)."""
    buffer = io.BytesIO()
    torch.save({name: value.detach().cpu().contiguous() for name, value in state.items()}, buffer)
    return buffer.getvalue()


def load_state(data: bytes) -> dict[str, torch.Tensor] | None:
    """The state `dump_state` wrote; None for empty bytes (a fresh state)."""
    if not data:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
