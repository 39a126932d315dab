"""Files the guardian writes and reads with care: durable (fsynced, atomic) writes, strict YAML.
The lowest layer: it imports nothing else of the guardian."""
