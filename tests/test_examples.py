"""Every example policy shipped in examples/ loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from cage.policy import load_policy_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
POLICIES = sorted(EXAMPLES.glob("*/.runcap/mission.yaml")) + sorted(
    EXAMPLES.glob("policies/*.yaml")
)


def test_there_are_examples_for_three_ecosystems():
    shapes = {p.parent.parent.name for p in POLICIES}
    assert {"python-pytest", "node-npm", "go"} <= shapes


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_policy_is_valid(path: Path):
    policy = load_policy_file(path)
    assert policy.verification.command
    assert policy.verification.allow, "an example with an empty allow could never PASS"
