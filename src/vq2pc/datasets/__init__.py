"""Dataset file formats and sources behind :mod:`vq2pc.data` (the public module)."""
