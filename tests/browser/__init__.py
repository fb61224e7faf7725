"""Browser tests of the live widgets (a package, so its conftest does not shadow tests/conftest.py)."""
