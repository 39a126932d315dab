"""The daemon process: its entry point, the gRPC servers on their Unix sockets, and the
housekeeping thread."""
