"""``python -m index_build``: a thin entry point; the build itself is ``medfinder.index.build``."""
