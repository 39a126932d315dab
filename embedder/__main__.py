"""``python -m embedder``: the same as the ``agent-embedder`` command."""

from embedder.main import main

main()
