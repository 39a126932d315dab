"""The guardian's state, built once at start: config, the state dir, the core that holds the
database, keys and policy in force, and the metrics."""
