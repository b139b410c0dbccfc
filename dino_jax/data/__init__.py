"""The input pipeline: sources, multi-crop augmentation, grain streams, the built-in dataset."""
