"""Stage 2 of the flow: the trained models. Networks, quantizers (one module per family), the
VQ-VAE, the priors over its codes (PixelCNN, Transformer) and the one trainer they share.

May import: :mod:`vq2pc.core`, :mod:`vq2pc.data`.
"""
