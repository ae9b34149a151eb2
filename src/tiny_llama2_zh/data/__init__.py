"""Data stage: corpora in, training files out."""
