"""Transforms that map fixed points to moving points (LPS mm): the
parametric models, dense displacements and a user's initial transform."""
