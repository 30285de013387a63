"""A model server as the Monte Carlo engine of ``predict_volume``: ``microsr-tf predict --server``.

Only the posterior of a normalised HR-grid slice is computed remotely, one whole slice per request;
reading, resampling, normalising, seeds, post-processing, units and writing stay the local code's, so
a remote run writes what a local run with the same options and seed writes (to float rounding).
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

    A base seed gives image ``b`` of a batch ``image_seeds(seed, B)[b]``, as
    :class:`~microsr_tf.inference.mc.MonteCarloPredictor` does (sent as one seed per image); per-image
    seeds are sent as they are. Percentiles need the raw samples, which the server does not return.
    """

    percentiles: tuple[float, ...] = ()

    def __init__(self, client: ServingClient, samples: int, seed: int | None = None):
        self.client = client
        self.samples = int(samples)
        self.seed = seed

    def predict(self, x, seed: int | Sequence[int] | None = None) -> MCResult:
        seed = self.seed if seed is None else seed
        if seed is None or isinstance(seed, (int, np.integer)):
            seed = resolve_seed(seed)
        else:
            seed = tuple(resolve_seed(s) for s in seed)
        mean, var = self.client.predict(np.asarray(x, np.float32), samples=self.samples, seed=seed)
        return MCResult(mean=np.asarray(mean, np.float32), var=np.asarray(var, np.float32), samples=self.samples,
                        seed=seed)


def remote_engine(client: ServingClient, samples: int, stitch: str = "whole") -> SliceEngine:
    """``engine(normalised_hr_slice, slice_seed) -> MCResult`` for ``predict_volume``: each slice's whole-slice
    posterior from the server, post-processed locally as ``stitch`` says (the paper's histogram matching
    and median filter for ``"paper"``), exactly as local prediction does."""
    messages.check_samples(samples)  # refused before any slice is read
    predictor = RemotePredictor(client, samples)

    def engine(image: np.ndarray, slice_seed: int) -> MCResult:
        predictor.seed = slice_seed
        return predict_slice(predictor, image, mode=stitch)

    return engine


def served_meta(client: ServingClient) -> dict:
    """The served model's metadata, checked as ``predict`` checks a local model's."""
    meta = client.metadata()
    check_prediction_meta(meta, f"{client.describe()} model '{client.model_name}' metadata")
    return meta
