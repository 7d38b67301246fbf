"""The DISA registration engine: pure Python, no web and no queue."""
