"""Metrics for the shapes world: the probe classifier (the judge), a CLIP-style image/text pair, Fréchet distance."""
