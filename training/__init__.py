"""Offline training of the DISA descriptor network (needs torch; never imported by the runtime).

Modules, one job each:
    sources     real volumes carried by installed packages + random label phantoms; the split
    synthesis   multimodal renderings of one anatomy (MR-, CT-, LUT-, label-, US-like settings)
    pairs       crop pairs on shared/relative grids with dense LC2 targets at descriptor centres
    sampling    the paper's patch-pair sampling with near-uniform LC2 targets (evaluation)
    data        deterministic, resumable batch stream for a torch DataLoader
    loop        the training loop (checkpoints, resume, budget, progress)
    evaluate    held-out MSE / Pearson r, by target bin, anatomy and setting
    export      ONNX + model card from a run
    cli         the `disa-train` command (fit / export / evaluate)
"""
