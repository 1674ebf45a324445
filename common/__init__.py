"""Shared code of the ShuffleNet-Series model zoo: layers, counting, input formats, data, checkpoints, training,
evaluation and export. The per-model folders import from here and declare only what is specific to them."""

from common.atomic_io import atomic_write
from common.checkpoint import get_training_state, load_checkpoint
from common.checkpoint_store import (CheckpointCorruptError, CheckpointError, CheckpointInfo, CheckpointWarning,
                                     CheckpointWriteError, get_latest_model, list_checkpoints, save_checkpoint,
                                     verify_checkpoint)
from common.model_state import (LoadReport, WeightsFileError, WeightsMismatchError, extract_model_state,
                                load_model_state, read_checkpoint_metadata, read_weights_file, unwrap_model)
