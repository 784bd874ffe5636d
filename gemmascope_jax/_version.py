"""The package version, on the lowest floor so any module can read it without importing the
package facade (`gemmascope_jax/__init__.py` sits above `formats`; see docs/architecture.md).
Kept equal to `version` in pyproject.toml."""

__version__ = "0.1.0"
