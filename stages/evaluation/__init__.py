"""Cheap evaluations beside training: linear probes and kNN classifiers on frozen embeddings, and how well their
ranking of selections agrees with trained accuracies."""
