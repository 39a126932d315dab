"""Recall by meaning (the local embedding model, vectors and their index by namespace, rank fusion) and
trust at recall. Imports only guardian.files and guardian.keys."""
