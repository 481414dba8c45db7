"""Training and evaluation: datasets, losses, the trainer, retrieval metrics, the demo recipe.

The library never imports this package; it imports the library.
"""
