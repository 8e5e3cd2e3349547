"""The documentation pages' scripts: the pictures (``python -m docs.pictures``) and the flags page (``python -m docs.flags``)."""
