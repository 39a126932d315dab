"""Everything in the SQLCipher database: the connection and schema, memories, their integrity,
the search index (and the scan form it reads), agents, the audit chain, idempotency records, backups."""
