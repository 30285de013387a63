"""microsr-tf: unpaired CT to micro-CT super-resolution with Monte Carlo dropout uncertainty.

The modules follow the data's path: volumes -> preprocessing -> patches/pipeline -> models ->
training -> inference (Monte Carlo, stitching, predict) -> export/serving -> evaluation.
"""

__version__ = "0.1.0"
