"""The foundations every stage stands on; imports nothing else of vq2pc.

* :mod:`~vq2pc.core.leaves` — the pixel distributions (Gaussian, Categorical, Bernoulli):
  one definition for the decoder head and the circuit's input units;
* :mod:`~vq2pc.core.files` — atomic files (temp file + rename) and JSON;
* :mod:`~vq2pc.core.checkpoint` — checkpoints saved atomically, loaded with ``weights_only=True``;
* :mod:`~vq2pc.core.distributed` — rank, world size, barriers and exact log-sum-exp all-reduces
  under ``torchrun`` (no-ops in one process);
* :mod:`~vq2pc.core.random` — random draws that are safe whatever device the generator is on;
* :mod:`~vq2pc.core.validate` — checks of user input (batches, values, masks), one message per fact;
* :mod:`~vq2pc.core.protocols` — the typed seams between stages (decoder, prior);
* :mod:`~vq2pc.core.optim` — Adam, fused where torch can (every training loop uses it).

May import: torch and the standard library only.
"""
