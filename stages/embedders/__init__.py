"""Embedders: models that turn images (and captions) into L2-normalised vectors, one file each, one registry;
``store.py`` is the embeddings artifact format every consumer reads."""
