"""The guardian's keys: loading them, key rings by id, rotated keys kept wrapped, the Ed25519 audit-signing
key and the audit trail's public proof (chain, signed heads, export). Imports only guardian.files."""
