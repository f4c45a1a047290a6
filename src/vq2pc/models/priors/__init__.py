"""Priors p(z | c) over a grid of codes; each satisfies :class:`vq2pc.core.protocols.Prior`.

May import: :mod:`vq2pc.core`, :mod:`vq2pc.data`, :mod:`vq2pc.models`.
"""
