"""The job core that the API and the workers share: settings, the job store, the manifest.

Neither the API (disa.service) nor the workers (disa.worker) are imported here:
both depend on this package, and the API reaches the workers only through its
dispatch module (docs/ARCHITECTURE.md, "Layers").
"""
