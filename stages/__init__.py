"""Curation stages, the reference trainer, and the networks and augmentations shared with distillation."""
