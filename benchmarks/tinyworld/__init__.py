"""The tiny world: a synthetic benchmark of concepts rendered in several modalities."""
