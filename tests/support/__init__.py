"""What the tests share and pytest does not collect: the guardian harness, the MCP harness, a fake guardian."""
