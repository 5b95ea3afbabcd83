"""Contrastive training: the loop, its config, data, augmentation, checkpoints, cached features and tower locks."""
