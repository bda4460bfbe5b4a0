"""The reference trainer shared by curation and distillation: networks, augmentation, losses, recipes, the
training loop, training data from artifacts and training-set loaders by artifact kind."""
