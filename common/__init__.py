"""Shared code of the ShuffleNet-Series model zoo: layers, counting, input formats, data, checkpoints, training,
evaluation and export. The per-model folders import from here and declare only what is specific to them."""
