"""The hostile-gateway suite: a compromised gateway speaking raw gRPC to the agent socket.

Each module is one family of attacks against a real guardian process on its real
Unix socket (tests/support/harness.py). Every attack has an id and a one-line statement of
what it tries, listed in the module's ``ATTACKS``; ``test_attack_count.py`` counts
them. For every attack the suite asserts (tests/security/hostile.py) the exact status
code (never OK for something forbidden, never INTERNAL or UNKNOWN), that the error
echoes neither the attack's payload nor an internal path, that nothing forbidden was
stored or returned, and the audit row the attempt left; each module's guardian must
still be alive and serving when the module ends.
"""
