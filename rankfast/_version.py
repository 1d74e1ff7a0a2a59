"""The version: the one source, read by setuptools for the package metadata and re-exported as
``rankfast.__version__`` (a module of its own, so modules inside the package need not import it)."""

__version__ = "0.1.0"
