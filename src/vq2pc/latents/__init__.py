"""Stage 3 of the flow: the latent space. Exact enumeration of p(z), the selection strategies
(exhaustive, sample, gumbel, beam, topk, data) and the batched beam searches.

Everything here needs a prior only through :class:`vq2pc.core.protocols.Prior`.
May import: :mod:`vq2pc.core`, :mod:`vq2pc.data`, :mod:`vq2pc.models`.
"""
