"""rnnserve: a stateful sequence-prediction server for recurrent models.

The installed namespace maps the repository's folders: `rnnserve.export` (export/, training and
export, needs torch), `rnnserve.server` (server/), `rnnserve.client` (client/), `rnnserve.v1`
(proto/, the generated gRPC stubs) and the torch-free pieces both sides share here
(`rnnserve.vocab`, `rnnserve.bundle`).
"""

__version__ = "0.1.0"
