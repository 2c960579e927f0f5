"""The checkpointable batch iterator shared by every training dataset, and host sharding.

Every training stream in nasjax is a grain ``MapDataset`` whose element ``s`` is the
process-local slice of global batch ``s``. Its iterator state is therefore one integer
(the next global step) plus a description of the data, so:

* resuming yields exactly the batches that would have come next;
* the state does not depend on the number of hosts, so a run may resume on a different
  slice topology with the same global batch;
* a state saved for different data (another seed, sequence length, batch size or corpus)
  is refused with a message naming what changed, instead of silently resuming elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import grain
import numpy as np

from nasjax.data.errors import DataError

__all__ = ["BatchIterator", "check_sharding", "host_rows", "make_step_dataset"]

Batch = dict[str, np.ndarray]

# Batches are built from in-memory (or memory-mapped) arrays in a millisecond or two, so
# a shallow prefetch suffices; grain's default (16 threads, 500 elements) would pin
# hundreds of large batches in host memory.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
_STATE_VERSION = 1


def check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validates host sharding and returns the per-process batch size."""
    if global_batch_size <= 0:
        raise DataError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    return global_batch_size // process_count


def host_rows(step: int, global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Global example positions of this process's rows of global batch ``step``.

    Process ``p`` owns the contiguous rows ``[p * b, (p + 1) * b)`` of every global batch,
    matching ``jax.make_array_from_process_local_data`` over a batch-sharded mesh whose
    devices are ordered by process.
    """
    local = global_batch_size // process_count
    first = step * global_batch_size + process_index * local
    return np.arange(first, first + local, dtype=np.int64)


def make_step_dataset(make_batch: Callable[[int], Batch]) -> grain.MapDataset:
    """An unbounded grain ``MapDataset`` whose element ``s`` is ``make_batch(s)``."""
    # grain's repeat(None) uses sys.maxsize as the length; a range that large is fine
    # because MapDataset is lazy and random access.
    return grain.MapDataset.range(np.iinfo(np.int64).max // 2).map(make_batch)


class BatchIterator(Iterator[Batch]):
    """Yields training batches forever; ``get_state``/``set_state`` make it resumable.

    Args:
        dataset: a step dataset from ``make_step_dataset``.
        description: JSON-able facts that identify the stream (seed, sizes, data key);
            stored in the state and compared on ``set_state``.
        read_options: grain prefetch settings.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        description: dict,
        read_options: grain.ReadOptions | None = None,
    ):
        self._dataset = dataset
        self._read_options = read_options or DEFAULT_READ_OPTIONS
        self._description = json.loads(json.dumps(description))
        self._it = iter(dataset.to_iter_dataset(self._read_options))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    @property
    def step(self) -> int:
        """Index of the global batch the next ``next()`` returns."""
        return int(self._it.get_state()["next_index"])

    def get_state(self) -> dict:
        """A JSON-serialisable state; pass it to ``set_state`` to resume."""
        return {"version": _STATE_VERSION, "grain": self._it.get_state(), "data": self._description}

    def set_state(self, state: dict) -> None:
        """Resumes at ``state``, so the next batch is the one that followed when it was saved.

        Raises:
            DataError: if the state was saved for a different data stream.
        """
        if state.get("version") != _STATE_VERSION or "grain" not in state:
            raise DataError(f"not a nasjax data iterator state: {json.dumps(state)[:200]}")
        saved = state.get("data", {})
        changed = {
            key: (saved.get(key), value)
            for key, value in self._description.items()
            if key in saved and saved[key] != value
        }
        if changed:
            details = ", ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in changed.items())
            raise DataError(f"cannot resume the data iterator: the data stream changed ({details})")
        # A fresh grain iterator, so prefetched batches from before are discarded.
        self._it = iter(self._dataset.to_iter_dataset(self._read_options))
        self._it.set_state(state["grain"])
