"""Finding the pose: the global multi-start search and its refinement,
orientation bins of the sampled maps, and the verdict on the result."""
