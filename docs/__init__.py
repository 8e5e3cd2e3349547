"""The README's pictures (``python -m docs.pictures``)."""
