"""nasjax: neural architecture search for efficient Transformers in JAX/Flax."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.0",
    "jaxlib>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "ml-collections>=1.0.0",
    "absl-py>=2.1.0",
    "grain>=0.2.12",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "sentencepiece>=0.2.0",
]

EXTRAS = {
    "tfds": ["tensorflow-datasets>=4.9", "tensorflow>=2.16"],
    "seqio": ["seqio>=0.0.19"],
    # The Austen corpus is decoded from Debian's R package with rdata.
    "corpora": ["rdata>=0.11"],
    # engine=ray: many evaluations at once on Ray actors (a laptop or a cluster).
    "ray": ["ray>=2.40"],
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6", "rdata>=0.11"],
}

setup(
    name="nasjax",
    version="0.1.0",
    description="Neural architecture search for efficient Transformers (Primer, AutoBERT-Zero, LTS, AutoDistil) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["nasjax", "nasjax.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["nasjax=nasjax.cli:main"]},
    license="Apache-2.0",
)
