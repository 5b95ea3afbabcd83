"""The application layer: command line, demo and HTTP server, over the core and ``indexing``."""
