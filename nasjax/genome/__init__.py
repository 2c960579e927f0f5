"""Genomes: search-space encodings that decode to model specs (Primer programs, ...)."""
