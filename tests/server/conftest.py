"""Fixtures of the server tests: a real `serve --model tiny-tr` without a key, one per test module
that asks for it (modules with servers of their own define their own `server`)."""

import pytest
from serve_util import Server


@pytest.fixture(scope="module")
def open_server():
    s = Server(key=None)
    yield s
    s.stop()
