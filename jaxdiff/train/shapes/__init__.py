"""Training the embedded `shapes` models, one module per stage on `jaxdiff.train.runner` (tools/train_shapes.py)."""
