"""DISA REST service: FastAPI app, job store, client and the `serve`/`submit` commands.

Importing this package imports nothing heavy: the worker imports the job store
and the settings from here without pulling in FastAPI.
"""
