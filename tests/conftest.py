"""Fixtures shared by all tests; the real-server ones live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.tools",
    "tests.fixtures.openbao",
    "tests.fixtures.kube",
    "tests.fixtures.prometheus",
    "tests.fixtures.nginx",
    "tests.fixtures.helm",
    "tests.fixtures.linkerd",
]
