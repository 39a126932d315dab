"""Code both processes use: the generated gRPC stubs, the error hierarchy and
the formats of the identifiers the guardian issues. Nothing here touches the
database, a key or the policy."""
