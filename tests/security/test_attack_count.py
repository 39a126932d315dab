"""The suite's inventory: every module's attacks, counted.

Each attack module lists its attacks in ``ATTACKS`` and parametrizes its tests from
that list, so every id below is a test case that ran. Counted: at least 40 distinct
attacks, and at least 40 of them denials that leave a deny row in the audit trail.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections import Counter
from pathlib import Path
from typing import Final

from tests.security.hostile import Attack

_HERE: Final = Path(__file__).parent
_ID_RE: Final = re.compile(r"[a-z0-9-]+\.[A-Za-z0-9-]+")
#: The attack modules: every test module of this package but this one.
MODULES: Final = sorted(
    info.name
    for info in pkgutil.iter_modules([str(_HERE)])
    if info.name.startswith("test_") and info.name != "test_attack_count"
)


def inventory() -> dict[str, tuple[Attack, ...]]:
    """Each attack module's ATTACKS."""
    found = {}
    for name in MODULES:
        module = importlib.import_module(f"tests.security.{name}")
        attacks = getattr(module, "ATTACKS", None)
        assert isinstance(attacks, tuple) and attacks, f"{name} lists no ATTACKS"
        found[name] = attacks
    return found


def test_every_attack_has_a_distinct_id_and_says_what_it_tries() -> None:
    attacks = [attack for listed in inventory().values() for attack in listed]
    duplicates = [name for name, count in Counter(attack.id for attack in attacks).items() if count > 1]
    assert not duplicates
    for attack in attacks:
        assert _ID_RE.fullmatch(attack.id), attack.id
        assert attack.tries and "\n" not in attack.tries and len(attack.tries) <= 120, attack.id
        assert attack.audited_as in ("deny", "allow", ""), attack.id


def test_at_least_forty_distinct_attacks() -> None:
    found = inventory()
    attacks = [attack for listed in found.values() for attack in listed]
    denials = [attack for attack in attacks if attack.audited_as == "deny"]
    summary = {name: len(listed) for name, listed in found.items()}
    assert len(MODULES) >= 10, MODULES
    assert len({attack.id for attack in attacks}) >= 40, summary
    assert len(denials) >= 40, f"{len(denials)} denials: {summary}"
