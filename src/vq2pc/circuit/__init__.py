"""Stage 4 of the flow: the product. :class:`MixtureCircuit` and its kernels and streaming
reductions, :class:`TreeCircuit` (a tree over the latent grid with patch-local leaves; :class:`GaussianTreeCircuit` with Gaussian leaves) and :class:`TreeMixture` (a sum over trees), the file format and input validation, distillation (plain, exact ExM, fine-tuned),
EM refinement, and export to libcirkit / npz.

May import: :mod:`vq2pc.core`, :mod:`vq2pc.data`, :mod:`vq2pc.models`, :mod:`vq2pc.latents`.
"""

from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.circuit.tree import TreeCircuit
from vq2pc.circuit.tree_gaussian import GaussianTreeCircuit
from vq2pc.circuit.tree_mixture import TreeMixture

__all__ = ["MixtureCircuit", "TreeCircuit", "GaussianTreeCircuit", "TreeMixture"]
