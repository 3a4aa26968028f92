"""Fixtures shared by all tests, from tests/support/: the real servers, and settings."""

pytest_plugins = [
    "tests.support.servers.tools",
    "tests.support.servers.openbao",
    "tests.support.servers.kube",
    "tests.support.servers.prometheus",
    "tests.support.servers.nginx",
    "tests.support.servers.helm",
    "tests.support.servers.linkerd",
    "tests.support.servers.node",
    "tests.support.fault_kinds",
    "tests.support.settings",
    "tests.support.hypothesis_profiles",
]
