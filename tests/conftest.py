"""Shared test fixtures: the model folders' networks, the released key lists, generated image folders."""
from __future__ import annotations

import ast
import importlib.util
import signal
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from common.demo_data import make_image_folder  # noqa: E402
from common.models import load_network_module  # noqa: E402

# A suite started in the background by a shell without job control (`make test &`, some CI runners) inherits SIGINT
# ignored, and so would every script the tests start and then interrupt: a handler here (reset to the default on
# exec) gives them Ctrl-C as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = REPO_ROOT.parent / "shared"
KEY_FILES = {"OneShot": "oneshot.txt", "ShuffleNetV2.Large": "large.txt", "ShuffleNetV2.ExLarge": "exlarge.txt"}


def released_keys(model: str) -> dict[str, tuple[int, ...]]:
    """Every state_dict entry of the original implementation of `model`, SE aliases included, in file order."""
    keys = {}
    for line in (FIXTURES / "keys" / KEY_FILES[model]).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            keys[key] = tuple(ast.literal_eval(shape))
    return keys


def released_state_dict(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict laid out like a released file (SE weights under both names), with random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in released_keys(model).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.05
    for key in list(state):
        for clean, alias in ((".se_fc1.", ".se_block.0."), (".se_fc2.", ".se_block.2.")):
            if clean in key:
                state[key] = state[key.replace(clean, alias)]
    return state


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A small ImageFolder tree of real JPEGs: 3 classes x 8 images of 48x48."""
    return make_image_folder(tmp_path_factory.mktemp("images"), num_classes=3, images_per_class=8, size=48)


def network(model: str):
    return load_network_module(model)


def script_module(model: str, script: str):
    """A model folder's script (train, eval, export) as a module; its `import network` gets that folder's."""
    spec = importlib.util.spec_from_file_location(f"{script}_{model.replace('.', '_')}",
                                                  REPO_ROOT / model / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("network")
    sys.modules["network"] = network(model)
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["network"]
        else:
            sys.modules["network"] = saved
    return module


def user_error_line(capsys, main, argv: list[str]) -> str:
    """Run a script's main in this process: it must exit with status 2 after one `error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]
