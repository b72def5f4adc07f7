"""A zoo of small models of the kinds researchers have, for end-to-end tests (tests/e2e/test_zoo.py)."""
