"""Non-linear stages after the rigid or affine pose: the dense
deformable stage, its discrete search and regularisers, and the
ultrasound probe-compression model."""
