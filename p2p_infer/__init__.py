"""p2p-infer: decentralized, verifiable split inference over a libp2p overlay.

Layers (kept apart so each can be tested alone):

* network: :mod:`identity`, :mod:`records`, :mod:`framing`, :mod:`host`, :mod:`dht`, :mod:`directory`
* ML: :mod:`models`, :mod:`manifest`, :mod:`tensors`, :mod:`shards`
* protocol logic (sans-IO): :mod:`records`, :mod:`routing`, :mod:`forward`
* processes: :mod:`peer`, :mod:`client`, :mod:`cli`, :mod:`harness`
"""

__version__ = "0.1.0"
