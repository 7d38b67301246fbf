"""Offline training of the DISA descriptor network (needs torch; never imported by the runtime).

Modules, one job each:
    sources     real volumes carried by installed packages + random label phantoms; the split
    synthesis   multimodal renderings of one anatomy (MR-, CT-, LUT-, label-, US-like settings)
    pairs       crop pairs on shared/relative grids with dense LC2 targets at descriptor centres
    sampling    the paper's patch-pair sampling with near-uniform LC2 targets (evaluation)
    data        deterministic, resumable batch (CPU loop) and scene (device loop) streams
    loop        the CPU training loop of v1-v5 (checkpoints, resume, budget, progress)
    device      crops, augmentation and LC2 targets on a torch device
    device_loop the device loop (--device cpu|cuda): shift-aware loss, bf16, wall clock
    scan        quick optimum-bias scan that picks a device-loop run's kept weights
    volume_cache  the training volumes as one float16 .npz (for machines without the data)
    evaluate    held-out MSE / Pearson r, by target bin, anatomy and setting
    export      ONNX + model card from a run
    cli         the `disa-train` command (fit / cache / export / quantise / evaluate)
"""
