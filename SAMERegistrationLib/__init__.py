"""SAMERegistration backend: image geometry, transforms, losses and the registration pipeline."""

__version__ = "0.1.0"
"""The package version (pyproject.toml reads it from here)."""
