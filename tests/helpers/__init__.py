"""Test doubles and fixtures' building blocks shared by several test modules (no test module imports
another). tests/ is on sys.path under pytest (its conftest.py sits there), so these import as
``helpers.<module>``."""
