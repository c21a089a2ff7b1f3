"""Where the tests' files are, for test modules in any folder of tests/ (tests/ is on pytest's path)."""

import os

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
DATA = os.path.join(TESTS, "data")
GOLDEN = os.path.join(DATA, "golden", "mdlm-tiny")
GOLDEN_MODEL = os.path.join(GOLDEN, "model")
