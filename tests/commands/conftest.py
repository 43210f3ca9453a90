"""Fixtures of the `cage ci` tests: the template project, built once per module, copied per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.commands.ci_repo import Project, build_template, make_project


@pytest.fixture(scope="module")
def template_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_template(tmp_path_factory)


@pytest.fixture
def project(template_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    return make_project(template_repo, tmp_path, monkeypatch)
