"""Fixtures shared by all tests; the real-server ones live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.tools",
    "tests.fixtures.openbao",
]
