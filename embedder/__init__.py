"""agent-embedder: turns texts into vectors for the guardian, in a process with no keys, no database, no network."""
