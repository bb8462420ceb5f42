"""Data sets for jaxdiff: the procedural `shapes` world and its TFDS builder."""
