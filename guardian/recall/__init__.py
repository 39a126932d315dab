"""Recall by meaning: the local embedding model, vectors and their index by namespace, rank fusion.
Imports only guardian.files and guardian.keys."""
