"""DISA REST service: FastAPI app, client, web page and the `serve`/`submit` commands.

Importing this package imports nothing heavy. The settings and the job store it
shares with the workers are disa.jobs; it hands jobs to the workers only in
dispatch.py and uses the engine only through engine_surface.py.
"""
