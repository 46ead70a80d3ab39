"""Alliance: submit WGSL compute jobs to a node of a GPU-pooling alliance
and get numpy arrays back.

>>> import numpy as np, alliance
>>> c = alliance.Client("http://127.0.0.1:7878", token="alliance_…")
>>> job = c.submit(kernel="library:sgemm", ...)
>>> job.wait(progress=True)
>>> job.results()
"""

from .client import AllianceError, Client, Job

__all__ = ["AllianceError", "Client", "Job"]
__version__ = "0.1.0"
