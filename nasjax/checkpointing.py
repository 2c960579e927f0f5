"""Checkpoints through orbax (the only module that imports it).

One ``CheckpointManager`` per run directory, used as a context manager, async saves,
``keep`` newest checkpoints, an interval policy deciding when ``save`` actually
writes. Each checkpoint is a Composite of the sharded train state plus JSON items
(model spec, config, data-iterator position, run bookkeeping), so a checkpoint is
self-describing: ``nasjax eval`` needs nothing else. A checkpoint that cannot be
read is reported by step and path, moved to ``corrupt_checkpoints/``, and the next
older one is restored, so a torn last save never loses the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp

JSON_ITEMS = ("spec", "config", "data", "run", "tokenizer")


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected."""


class Checkpointer:
    """Saves and restores ``state`` plus JSON side items under ``directory``.

    Args:
      directory: checkpoint folder (created).
      save_every: interval policy in steps (``save(..., force=True)`` overrides it).
      keep: how many checkpoints to keep.
      async_save: write in a background thread while training continues.
    """

    def __init__(self, directory: str, save_every: int = 1000, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(int(save_every), 1),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # context manager -------------------------------------------------------
    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # queries ---------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    # save / restore ----------------------------------------------------------
    def save(self, step: int, state: Any, force: bool = False, **json_items: Any) -> bool:
        """Saves if the interval policy (or ``force``) says so; returns whether it did."""
        unknown = set(json_items) - set(JSON_ITEMS)
        if unknown:
            raise ValueError(f"unknown checkpoint items {sorted(unknown)}; known: {JSON_ITEMS}")
        if int(step) in self._manager.all_steps():
            return False  # the interval policy already wrote this step
        items = {"state": ocp.args.StandardSave(state)}
        items.update({k: ocp.args.JsonSave(v) for k, v in json_items.items() if v is not None})
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_json(self, step: int | None = None, names: tuple[str, ...] = JSON_ITEMS) -> dict[str, Any]:
        """Reads only the JSON items of a checkpoint (no arrays)."""
        step = self._resolve_step(step)
        out = {}
        for name in names:
            try:
                res = self._manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
                out[name] = res[name]
            except Exception:  # an item a checkpoint does not hold (older writer) is simply absent
                continue
        return out

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        log: Callable[[str], None] = print,
    ) -> tuple[int, Any, dict[str, Any]]:
        """Restores the newest readable checkpoint at or below ``step``.

        Args:
          abstract_state: ShapeDtypeStructs with shardings (the restore target).
          step: a specific step, or None for the latest.
          log: where to report a checkpoint that could not be read.

        Returns:
          (step, state, json_items).

        Raises:
          CheckpointError: no checkpoint could be read; the message lists each failure.
        """
        steps = [s for s in self.all_steps() if step is None or s <= step]
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        failures = []
        for s in reversed(steps):
            try:
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                restored = self._manager.restore(s, args=ocp.args.Composite(**items))
                json_items = self.restore_json(s)
                if failures:
                    log(f"warning: fell back to checkpoint step {s} after: " + "; ".join(failures))
                    self._quarantine([t for t in steps if t > s])
                return s, restored["state"], json_items
            except Exception as e:  # orbax raises many types for torn / foreign files
                msg = f"checkpoint step {s} in {self.directory} is unreadable ({type(e).__name__}: {str(e)[:300]})"
                failures.append(msg)
                log(f"warning: {msg}")
        raise CheckpointError("no readable checkpoint: " + "; ".join(failures))

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints aside (kept for inspection) so new saves can use their steps."""
        dest = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        os.makedirs(dest, exist_ok=True)
        for s in steps:
            src = os.path.join(self.directory, str(s))
            if os.path.isdir(src):
                target = os.path.join(dest, f"{s}")
                n = 1
                while os.path.exists(target):
                    target, n = os.path.join(dest, f"{s}.{n}"), n + 1
                os.replace(src, target)
        self._manager.reload()

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        return step
