"""The `postgres` and `ray` markers are real (tests/conftest.py): a test that needs the service skips
with the reason where it is missing, and fails instead where CI requires it (DILS_REQUIRE_*=1)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).resolve().parent / "conftest.py").read_text()
TESTS = """
import pytest

@pytest.mark.ray
def test_needs_ray():
    import ray  # noqa: F401

def test_any_url(any_url):
    assert any_url

def test_postgres_fixture(postgres_url):
    assert postgres_url
"""


@pytest.mark.parametrize("require", [False, True])
def test_missing_services_skip_with_a_reason_or_fail_when_required(
        require: bool, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray[tune] were not installed
    monkeypatch.delenv("DILS_TEST_POSTGRES_URL", raising=False)
    for name in ("DILS_REQUIRE_RAY", "DILS_REQUIRE_POSTGRES"):
        monkeypatch.setenv(name, "1" if require else "0")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_services=TESTS)
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly")
    text = result.stdout.str()
    if require:  # failed in set-up: errors
        result.assert_outcomes(passed=1, errors=3)  # any_url's sqlite case runs
        assert "DILS_REQUIRE_RAY=1 but ray[tune] is not installed" in text
        assert "DILS_REQUIRE_POSTGRES=1 but no PostgreSQL server" in text
    else:
        result.assert_outcomes(passed=1, skipped=3)
        assert "ray[tune] is not installed: pip install 'dils-search[ray]'" in text
        assert "no PostgreSQL server: set DILS_TEST_POSTGRES_URL" in text
