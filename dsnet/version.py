"""The package version, in its own module so that any module can read it without importing
the public API (which imports the models)."""

__version__ = "0.1.0"
