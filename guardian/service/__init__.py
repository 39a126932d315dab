"""The gRPC services: the pipeline and its dispatch rules, the agent and admin handlers,
the shape checks and the one mapping of errors to status codes."""
