"""Spec -> module (:func:`build`) and the model zoo (:func:`get_spec`)."""

from nasjax.models.transformer import Transformer, build
from nasjax.models.zoo import SIZES, ZOO_NAMES, get_spec

__all__ = ["SIZES", "ZOO_NAMES", "Transformer", "build", "get_spec"]
