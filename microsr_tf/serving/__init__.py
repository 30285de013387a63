"""Clients for a TF-Serving model server running a microsr-tf export (gRPC or REST, TLS, tokens).

:mod:`.messages` builds and checks requests for the exported signatures and reads the answers;
:mod:`.client` carries them to the server (secure by default: plain text only to loopback unless
asked); :mod:`.remote` plugs a server into ``predict_volume`` as its Monte Carlo engine.
"""

from .client import ServingClient, ServingError, Endpoint
from .remote import RemotePredictor, remote_engine, served_meta

__all__ = ["ServingClient", "ServingError", "Endpoint", "RemotePredictor", "remote_engine", "served_meta"]
