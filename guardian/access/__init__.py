"""Who may administer the guardian: each person's Ed25519 key and role, signed requests, the two-person rule."""
