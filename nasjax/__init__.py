"""nasjax: neural architecture search for efficient Transformers in JAX/Flax.

Importing the package keeps freed host-heap pages for reuse by XLA:CPU's next
execution (:mod:`nasjax.hostmem`; ``NASJAX_HOST_HEAP=auto|reuse|one_arena|system``).
"""

from nasjax import hostmem as _hostmem

_hostmem.configure_from_env()
