"""inline: scanner-inline, real-time MR reconstruction and inference runtime.

The scanner streams raw k-space over TCP in the ISMRMRD/MRD v1 streaming protocol
(:mod:`inline.protocol`); a chain of gadgets (:mod:`inline.chain`) reconstructs it and
images plus text messages go back over the same connection (:mod:`inline.server`).
"""

__version__ = "0.1.0"
