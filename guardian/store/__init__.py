"""Everything in the SQLCipher database: the connection and schema, memories, their integrity and
provenance, the search index (and its scan form), agents, the audit chain, idempotency, backups."""
