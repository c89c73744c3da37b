"""Defaults shared by several stages and the CLI, kept in one torch-free place.

The config models (``CompressConfig``, ``Budget``) take their defaults from here and the
CLI's help text reads them, so a default is never written twice.
"""

from __future__ import annotations

# Accuracy points a compressed variant may lose against its parent before it is rejected:
# about the seed-to-seed spread of a small model on a few hundred test images.
MAX_DROP_POINTS = 1.0
