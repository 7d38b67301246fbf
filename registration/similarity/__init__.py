"""Similarities and their objectives: the descriptor maps (DISA network,
MIND-SSC), LC2, the compiled cost kernels and the Similarity
interface that tells the pipeline how each one behaves."""
