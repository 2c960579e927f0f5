"""Search algorithms, the journal and evaluation engines."""
