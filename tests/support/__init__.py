"""What the tests share: real-server fixtures, builders, stand-ins and harnesses.

Test modules import from here (and from ``ca_daemon`` and libraries), never from one
another (``tests/architecture/test_test_layout.py`` checks it).
"""
