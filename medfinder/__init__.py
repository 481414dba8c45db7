"""MedFinder: similar-case retrieval for 3D CT (text-to-image, image-to-text, keyword)."""

__version__ = "0.1.0"
