"""The package version, in a module of its own so that any layer can read it without importing the package's
public API (tweet_embed/__init__ re-exports it)."""

__version__ = "0.1.0"
