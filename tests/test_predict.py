"""predict.py: top-k names and probabilities for released and trained files, JSON, bad files, EXIF, --class-names."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.data import decode_rgb_array, open_image
from common.imagenet import imagenet_names
from common.predict import ImageTransform, run_predict
from common.release import write_release
from conftest import REPO_ROOT, network, released_state_dict

ONESHOT = network("OneShot")


@pytest.fixture(scope="module")
def released_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("released") / "oneshot.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in released_state_dict("OneShot").items()}}, path)
    return path


@pytest.fixture(scope="module")
def trained_file(tmp_path_factory, image_folder) -> Path:
    """A release file of this project for the 3 classes of `image_folder`, as train.py and release.py write it."""
    torch.manual_seed(0)
    model = ONESHOT.create_network(3)
    classes = sorted(p.name for p in image_folder.iterdir())
    path = tmp_path_factory.mktemp("trained") / "trained.safetensors"
    write_release(path, model.state_dict(), {"arch": "OneShot", "classes": classes, "num_classes": 3,
                                             "image_size": 64, "input_format": ONESHOT.INPUT_FORMAT.to_dict()})
    return path


def test_released_file_through_the_script_json_and_bad_files(tmp_path, released_file, image_folder):
    folder = tmp_path / "photos"
    shutil.copytree(image_folder, folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "red_disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    output = tmp_path / "predictions.json"
    result = subprocess.run(
        [sys.executable, "predict.py", "--weights", str(released_file), str(folder), "--top-k", "1000",
         "--predictions-json", str(output), "--batch-size", "10", "--workers", "2", "--image-size", "64"],
        cwd=REPO_ROOT / "OneShot", capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if "broken.jpg" in line]
    assert len(skipped) == 1 and skipped[0].startswith("skipped")
    assert "ignored 1 file" in result.stderr
    *_, summary, wrote = result.stdout.splitlines()
    assert "images/s" in summary and "24 images" in summary and wrote == f"wrote {output}"

    records = json.loads(output.read_text())
    images = sorted(str(p) for p in folder.rglob("*.jpg") if p.name != "broken.jpg")
    assert [r["path"] for r in records] == images
    names = imagenet_names()
    for record in records:
        assert set(record) == {"path", "predictions"}
        predictions = record["predictions"]
        assert all(set(p) == {"index", "name", "probability"} for p in predictions)
        assert sorted(p["index"] for p in predictions) == list(range(1000))
        assert all(p["name"] == names[p["index"]] for p in predictions)
        probabilities = [p["probability"] for p in predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)


def test_trained_file_names_its_class_folders(trained_file, image_folder, capsys):
    records = run_predict(ONESHOT, ["--weights", str(trained_file), str(image_folder / "red_disc"), "--top-k", "5",
                                    "--workers", "0"])
    # The layout is timed at the size the images are cropped to (it was 224 whatever the crop), and said.
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("OneShot: 8 images, 64px center crop, input BGR 0..255; ")
    assert "(auto, timed on 4 images of 64px: " in header
    assert len(records) == 8
    for record in records:
        assert len(record["predictions"]) == 3  # top-k is capped at the number of classes
        assert {p["name"] for p in record["predictions"]} == {"red_disc", "green_square", "blue_triangle"}
        assert sum(p["probability"] for p in record["predictions"]) == pytest.approx(1.0, abs=1e-5)


def test_folders_are_searched_as_training_folders_and_each_image_read_once(trained_file, image_folder, tmp_path,
                                                                          capsys):
    """Linked folders were dropped without a word, hidden ones read (eval.py and train.py do the opposite), and a
    folder given twice classified twice."""
    folder = tmp_path / "photos"
    shutil.copytree(image_folder / "red_disc", folder / "discs")
    (folder / "squares").symlink_to(image_folder / "green_square")
    (folder / ".ipynb_checkpoints").mkdir()
    shutil.copy(next((folder / "discs").glob("*.jpg")), folder / ".ipynb_checkpoints" / "copy.jpg")
    records = run_predict(ONESHOT, ["--weights", str(trained_file), str(folder), str(folder / "discs"),
                                    str(folder / "squares"), "--workers", "0", "--top-k", "4"])
    paths = [record["path"] for record in records]
    assert len(paths) == 16 and len(set(paths)) == 16
    assert sum("/squares/" in path for path in paths) == 8 and not any("/." in path for path in paths)
    assert "note: --top-k 4: the weights predict 3 classes, so each image shows 3" in capsys.readouterr().err


def test_a_reader_that_leaves_early_does_not_cost_the_file(trained_file, image_folder, tmp_path):
    """`predict.py ... --predictions-json F | head` ended with status 141 and no F: eval.py writes its files first."""
    output = tmp_path / "predictions.json"
    command = [sys.executable, "predict.py", "--weights", str(trained_file), str(image_folder), "--workers", "0",
               "--predictions-json", str(output)]
    result = subprocess.run(f"{' '.join(command)} | true; exit ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash",
                            cwd=REPO_ROOT / "OneShot", capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr
    assert len(json.loads(output.read_text())) == 24


def test_the_layout_flags_are_eval_pys(trained_file, image_folder, capsys):
    """predict.py had no --channels-last / --no-fast, which eval.py has, and always took the fast path."""
    folder = str(image_folder / "red_disc")
    fast = run_predict(ONESHOT, ["--weights", str(trained_file), folder, "--workers", "0", "--channels-last"])
    assert "channels_last float32 (set by the flags or the device)" in capsys.readouterr().out.splitlines()[0]
    plain = run_predict(ONESHOT, ["--weights", str(trained_file), folder, "--workers", "0", "--no-fast"])
    assert "; NCHW float32 (set by the flags or the device)" in capsys.readouterr().out.splitlines()[0]
    for one, other in zip(fast, plain):
        assert [p["index"] for p in one["predictions"]] == [p["index"] for p in other["predictions"]]
        assert [p["probability"] for p in one["predictions"]] == pytest.approx(
            [p["probability"] for p in other["predictions"]], abs=1e-4)


def test_class_names_file(tmp_path, trained_file, image_folder, capsys):
    names = tmp_path / "names.txt"
    names.write_text("disc\nsquare\n\ntriangle\n")
    image = next((image_folder / "green_square").iterdir())
    records = run_predict(ONESHOT, ["--weights", str(trained_file), str(image), "--class-names", str(names),
                                    "--workers", "0"])
    assert {p["name"] for p in records[0]["predictions"]} == {"disc", "square", "triangle"}
    names.write_text("only\ntwo\n")
    with pytest.raises(SystemExit) as stopped:
        run_predict(ONESHOT, ["--weights", str(trained_file), str(image), "--class-names", str(names)])
    assert stopped.value.code == 2
    assert "2 names, but the weights predict 3 classes" in capsys.readouterr().err


def test_exif_orientation_is_honoured(tmp_path):
    pixels = torch.zeros(40, 80, 3, dtype=torch.uint8)
    pixels[:, :40] = 255  # left half white
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the image rotated 90 degrees clockwise
    Image.fromarray(pixels.numpy()).save(path, exif=exif, quality=95)
    upright = decode_rgb_array(open_image(str(path)))
    assert upright.shape == (80, 40, 3)
    top = upright[:40].mean()
    assert top > 200  # the white left half is now on top
    x = ImageTransform(ONESHOT.INPUT_FORMAT, 32)(path)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_missing_path_is_one_line(released_file, capsys):
    with pytest.raises(SystemExit):
        run_predict(ONESHOT, ["--weights", str(released_file), "/no/such/photo.jpg"])
    assert capsys.readouterr().err.strip() == "error: /no/such/photo.jpg: no such file or folder"


def test_missing_weights_is_one_line_even_beside_files_that_are_not_images(image_folder, tmp_path, capsys):
    """The count of ignored files came first, before the weights were checked: two lines for one mistake."""
    (tmp_path / "notes.txt").write_text("not an image")
    shutil.copy(next(image_folder.rglob("*.jpg")), tmp_path)
    with pytest.raises(SystemExit):
        run_predict(ONESHOT, ["--weights", str(tmp_path / "missing.pth"), str(tmp_path)])
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.pth'}: no such file; check the path"


def test_nothing_readable_is_an_error_and_writes_no_json(released_file, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG")
    output = tmp_path / "predictions.json"
    with pytest.raises(SystemExit) as stop:
        run_predict(ONESHOT, ["--weights", str(released_file), str(tmp_path / "broken.jpg"), "--json", str(output),
                              "--workers", "0", "--image-size", "64"])
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    # --json, the flag's older name, still works.
    assert error == ("error: the image could not be read (see above), so nothing was classified and "
                     "--predictions-json was not written")
    assert not output.exists()


def test_under_torchrun_predict_refuses_before_reading_anything(released_file, image_folder):
    from test_train import free_port

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "predict.py", "--weights", str(released_file), str(image_folder)],
                            cwd=REPO_ROOT / "OneShot", capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "predict.py\", line" not in result.stderr
    # Each rank refuses alike, but torchrun stops the others once the first has exited: one line or two.
    assert result.stderr.count("error: predict.py runs in one process: start it with python, not torchrun") in (1, 2)
    assert ": " not in result.stdout
