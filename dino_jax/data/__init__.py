"""The input pipeline: sources, multi-crop augmentation, DINOv2's masks, grain streams, the
built-in datasets."""
