"""cacheproxy: a caching HTTP forward proxy on Twisted with a diskcache store."""

__version__ = "0.1.0"
