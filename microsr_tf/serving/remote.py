"""A model server as the Monte Carlo engine of ``predict_volume``: ``microsr-tf predict --server``.

Only the posterior of a normalised HR-grid slice is computed remotely; reading, resampling,
normalising, seeds, stitching, units and writing stay the local code's, so a remote run writes what a
local run with the same options and seed writes (to float rounding).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..inference.mc import MCResult, resolve_seed
from ..models.artifact import check_prediction_meta
from ..inference.predict import SliceEngine
from ..inference.stitching import predict_slice
from . import messages
from .client import ServingClient


class RemotePredictor:
    """The predictor interface :func:`~microsr_tf.inference.stitching.predict_slice` uses, with the
    ``samples`` dropout passes run by the server's ``mc_seeded`` signature.

    A base seed is sent as it is (the server gives image ``b`` of a batch ``image_seeds(seed, B)[b]``,
    as :class:`~microsr_tf.inference.mc.MonteCarloPredictor` does); per-image seeds (tiles) are sent
    one per image. Percentiles need the raw samples, which the server does not return.
    """

    percentiles: tuple[float, ...] = ()

    def __init__(self, client: ServingClient, samples: int, seed: int | None = None):
        self.client = client
        self.samples = int(samples)
        self.seed = seed

    def fits(self, height: int, width: int) -> bool:
        """Always: the limit on a whole slice is the message size, which the client checks per request."""
        return True

    def predict(self, x, seed: int | Sequence[int] | None = None) -> MCResult:
        seed = self.seed if seed is None else seed
        if seed is None or isinstance(seed, (int, np.integer)):
            seed = resolve_seed(seed)
        else:
            seed = tuple(resolve_seed(s) for s in seed)
        mean, var = self.client.predict(np.asarray(x, np.float32), samples=self.samples, seed=seed)
        return MCResult(mean=np.asarray(mean, np.float32), var=np.asarray(var, np.float32), samples=self.samples,
                        seed=seed)


def remote_engine(client: ServingClient, samples: int, stitch: str = "whole", tile: int = 256,
                  overlap: float = 0.25, batch_size: int = 8) -> SliceEngine:
    """``engine(normalised_hr_slice, slice_seed) -> MCResult`` for ``predict_volume``, tiling and stitching
    exactly as local prediction does (``stitch``, ``tile``, ``overlap``, ``batch_size`` tiles per request)."""
    messages.check_samples(samples)  # refused before any slice is read
    predictor = RemotePredictor(client, samples)

    def engine(image: np.ndarray, slice_seed: int) -> MCResult:
        predictor.seed = slice_seed
        return predict_slice(predictor, image, mode=stitch, tile=tile, overlap=overlap, batch_size=batch_size)

    return engine


def served_meta(client: ServingClient) -> dict:
    """The served model's metadata, checked as ``predict`` checks a local model's."""
    meta = client.metadata()
    check_prediction_meta(meta, f"{client.describe()} model '{client.model_name}' metadata")
    return meta
