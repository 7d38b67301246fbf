"""The shared core every layer may import: errors and exit codes, atomic
writes, voxel grids, image input and intensity preprocessing. It imports
nothing of DISA outside itself."""
