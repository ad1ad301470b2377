"""The tests package (the repository root is on sys.path, for `tests.utils`)."""
