"""Distillation: the teacher wrapper, teacher ODE solves and the pair store, and the methods (rectified flow)."""
