"""The guardian's keys: loading and validating them, key rings by id, and rotated keys kept wrapped.
Imports only guardian.files."""
