"""DISA worker: the Celery app and the job function around the registration engine.

`disa.worker.execute` runs one job from its folder and is shared by the Celery
task and the API's embedded worker; `disa.worker.app` is the Celery app
(`celery -A disa.worker.app worker` or `disa worker`).
"""
