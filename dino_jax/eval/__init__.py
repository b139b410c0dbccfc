"""Evaluation of trained backbones: feature extraction and k-NN classification."""
