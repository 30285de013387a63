"""Training recipes stored with the package: one ``microsr-tf train --config`` YAML per method.

``cyclegan.yaml``, ``unet.yaml`` and ``srgan.yaml`` are the CPU recipes that ``microsr-tf reproduce``
trains (the ``cpu`` preset); ``tiny/`` holds networks of a few filters on 32 px patches for tests and
smoke runs (the ``tiny`` preset), whose numbers mean nothing. Epochs and steps per epoch are left out:
``reproduce`` sets them from the time budget. Any of them also works on its own, e.g.
``microsr-tf train --config "$(python -c 'import microsr_tf.presets as p; print(p.path("cyclegan"))')" ...``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PRESETS = ("cpu", "tiny")
_FOLDERS = {"cpu": "", "tiny": "tiny"}


def path(method: str, preset: str = "cpu") -> Path:
    """The YAML file of ``method``'s recipe in ``preset``."""
    folder = resources.files(__name__)
    if _FOLDERS[preset]:
        folder = folder / _FOLDERS[preset]
    return Path(str(folder / f"{method}.yaml"))
