"""The DISA registration engine: pure Python, no web and no queue."""

from disa.registration.threads import apply_wait_policy

# Before numba starts its OpenMP pool (see threads.py: spinning workers stall the
# serial refinement on a busy machine).
apply_wait_policy()
