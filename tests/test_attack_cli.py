"""The attack script of issue "Hardening" (tests/attack_cli.py) in its quick mode: every attack holds."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import attack_cli  # noqa: E402


def test_the_quick_attacks_all_hold(tmp_path: Path) -> None:
    report = attack_cli.run(quick=True, budget=300, workdir=tmp_path, fuzz=10)
    failed = [a for a in report["attacks"] if a["result"] != "held"] + report["fuzz_failures"]
    assert failed == [], failed
    assert report["held"] == sum(quick for _, quick, _ in attack_cli.ATTACKS) >= 25
    assert report["fuzzed"] == 10
