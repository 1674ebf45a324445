"""Every snippet of the README's "Use the models in your own code" runs in a fresh clone, with small real files.

The snippets name `OneShot.pth.tar` (made here in the released layout), `photos/` and `my_data/` (generated JPEG
folders). The one change made to a snippet: train.py commands get flags that shrink the run to two iterations of
tiny images, so that the fine-tuning snippet is exercised without its full default schedule.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.demo_data import make_image_folder
from conftest import REPO_ROOT, released_state_dict

SECTION = "## Use the models in your own code"
SHORT_TRAINING = " --total-iters 2 --image-size 32 --batch-size 8 --workers 0"


def snippets(readme: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the section."""
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    root = tmp_path_factory.mktemp("readme") / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(root)], check=True, timeout=120)
    torch.save({"state_dict": released_state_dict("OneShot")}, root / "OneShot.pth.tar")
    make_image_folder(root / "photos", num_classes=2, images_per_class=2, size=48)
    make_image_folder(root / "my_data" / "train", num_classes=3, images_per_class=4, size=40)
    make_image_folder(root / "my_data" / "val", num_classes=3, images_per_class=2, size=40, seed=1)
    return root


def test_the_section_has_a_snippet_for_each_use():
    blocks = snippets((REPO_ROOT / "README.md").read_text())
    code = "\n".join(code for _, code in blocks)
    for use in ("predict.py", "--pretrained", "features_only=True", "torch.hub.load", "timm.create_model"):
        assert use in code, use


@pytest.mark.parametrize("index", range(5))
def test_snippet_runs_in_a_fresh_clone(clone, index):
    blocks = snippets((clone / "README.md").read_text())
    assert len(blocks) == 5
    language, code = blocks[index]
    # `python` is this interpreter, as in a shell with the project's environment activated.
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    if language == "bash":
        code = re.sub(r"(python train\.py [^\n]*)", r"\1" + SHORT_TRAINING, code)
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-"]
    result = subprocess.run(command, input=None if language == "bash" else code, cwd=clone, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{code}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    if "predict.py" in code:
        assert (clone / "predictions.json").exists() and "images/s" in result.stdout
    if "--pretrained" in code:
        assert "re-initialised classifier" in result.stdout and (clone / "finetuned").is_dir()
