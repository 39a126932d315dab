"""System tests: the deployment under a real systemd booted in a throwaway Debian root (issue 6)."""
