"""The guardian: the privileged daemon that alone holds the encrypted memory
database, the keys and the policy, and decides every request.

Imports nothing from ``gateway`` or ``mcp`` (tests/unit/test_boundaries.py checks).
"""
