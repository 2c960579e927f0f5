"""Bi-branch weight sharing (BIWS) for AutoBERT-Zero children (methods.md §1(b)).

The supernet keeps, for every layer, *both* branches:

* ``attn``: ``q_proj, k_proj, v_proj, o_proj`` (+ the layer's post-mixer norm). Every
  attention graph shares them: primitive ops have no parameters, so any graph can start
  from them (a graph that does not read V simply ignores ``v_proj``).
* ``conv``: the GLU light-conv block's ``in_proj``, ``out_proj`` (+ norm) and the
  lightweight-conv kernel at the *largest* size of the kernel set; a child with kernel
  k takes the centred window ``[(kmax - k) / 2, (kmax + k) / 2)`` (OFA-style).

Everything else (embeddings, FFNs, the MLM head, the pooler) is one ``shared`` group.

A child starts from the supernet weights of the branch it selects in every layer
(:meth:`SuperNet.inherit`), pre-trains briefly, and its trained weights are written
back (:meth:`SuperNet.update`): ``w <- (1 - rate) w + rate * w_child`` on the slices it
used (``rate`` 1 = overwrite, the default; how the paper updates is UNCONFIRMED).
Fine-tuned classifier weights are never written back.

Arrays are numpy, keyed ``"<group>:<param path>"`` (path = ``/``-joined Flax keys, e.g.
``attn:encoder/layer_3/mixer/q_proj/kernel``). The supernet is saved as ``.npz`` after
every update (atomically, the last few versions kept), so a resumed search continues
from the supernet its journal says it had.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

__all__ = ["SuperNet", "SuperNetError", "flat_params", "nested_params", "branch_key"]

_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/(mixer|mixer_norm)/")
_CONV_KERNEL = "/mixer/conv/kernel"


class SuperNetError(RuntimeError):
    """A supernet file is missing or corrupt (message names the file)."""


def flat_params(params: Mapping) -> dict[str, np.ndarray]:
    """Nested Flax params (boxed or not) -> {"a/b/c": numpy array}."""
    params = nn.meta.unbox(dict(params))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def nested_params(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def branch_key(path: str, layer_kinds: tuple[str, ...]) -> str:
    """The supernet key of a child's parameter ``path`` given each layer's kind (attn/conv)."""
    m = _LAYER.match(path)
    if m is None:
        return f"shared:{path}"
    i = int(m.group(2))
    if i >= len(layer_kinds):
        raise ValueError(f"parameter {path} belongs to layer {i}, but the genome has {len(layer_kinds)} layers")
    return f"{layer_kinds[i]}:{path}"


def _window(kmax: int, k: int) -> slice:
    start = (kmax - k) // 2
    return slice(start, start + k)


class SuperNet:
    """The shared weights (see the module docstring).

    Args:
      arrays: ``"<group>:<path>"`` -> array.
      version: number of updates applied so far (a child's evaluation = one update).
    """

    def __init__(self, arrays: dict[str, np.ndarray], version: int = 0):
        self.arrays = {k: np.array(v) for k, v in arrays.items()}
        self.version = int(version)

    def copy(self) -> SuperNet:
        """An independent snapshot (what a candidate asked now inherits, whatever is told later)."""
        return SuperNet(self.arrays, self.version)

    @classmethod
    def initial(cls, attn_params: Mapping, conv_params: Mapping) -> SuperNet:
        """From an all-attention model's params (shared + attn branches) and an all-conv
        model at the largest kernel (conv branches)."""
        arrays = {}
        attn_flat, conv_flat = flat_params(attn_params), flat_params(conv_params)
        for path, value in attn_flat.items():
            group = "shared" if _LAYER.match(path) is None else "attn"
            arrays[f"{group}:{path}"] = value
        for path, value in conv_flat.items():
            if _LAYER.match(path) is not None:
                arrays[f"conv:{path}"] = value
        return cls(arrays)

    # ------------------------------------------------------------------ child <-> supernet
    def _source(self, key: str, path: str, shape: tuple) -> tuple[np.ndarray | None, Any]:
        """(supernet array, index into it) that corresponds to a child leaf of ``shape``."""
        full = self.arrays.get(key)
        if full is None:
            return None, None
        if path.endswith(_CONV_KERNEL) and key.startswith("conv:") and full.shape != shape:
            kmax, k = full.shape[-1], shape[-1]
            if full.shape[:-1] != shape[:-1] or k > kmax or k % 2 != kmax % 2:
                return None, None
            return full, (..., _window(kmax, k))
        if full.shape != shape:
            return None, None
        return full, ...

    def inherit(self, child_params: Mapping, layer_kinds: tuple[str, ...]) -> tuple[dict, int, list[str]]:
        """A child's params with every leaf that has a supernet counterpart replaced by it.

        Returns:
          (nested params, leaves copied, paths left at their fresh initialisation).
        """
        flat = flat_params(child_params)
        copied, missing = 0, []
        for path, value in flat.items():
            full, index = self._source(branch_key(path, layer_kinds), path, value.shape)
            if full is None:
                missing.append(path)
                continue
            flat[path] = np.array(full[index], dtype=value.dtype)
            copied += 1
        return nested_params(flat), copied, missing

    def update(self, child_params: Mapping, layer_kinds: tuple[str, ...], rate: float = 1.0) -> int:
        """Writes a trained child's weights back into the slices it used; returns leaves written."""
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"BIWS update rate must be in (0, 1], got {rate}")
        written = 0
        for path, value in flat_params(child_params).items():
            full, index = self._source(branch_key(path, layer_kinds), path, value.shape)
            if full is None:
                continue
            old = full[index]
            full[index] = value if rate == 1.0 else (1.0 - rate) * old + rate * value
            written += 1
        self.version += 1
        return written

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """Atomic write of ``path`` (.npz with the arrays and the version)."""
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, __version__=np.asarray(self.version), **self.arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> SuperNet:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files if k != "__version__"}
                version = int(data["__version__"])
        except FileNotFoundError:
            raise SuperNetError(f"supernet file {path} is missing") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise SuperNetError(f"supernet file {path} is corrupt or unreadable ({type(e).__name__}: {e})") from None
        return cls(arrays, version)
