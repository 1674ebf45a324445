"""torch.hub from a fresh clone, and the timm registration against create_network plus eval.py's loading."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import common.timm_models  # noqa: F401  (registers the models with timm)
from common.errors import UserError
from common.input_format import Preprocess
from common.model_state import WeightsFileError, load_model_state
from common.pretrained import create_model
from common.release import write_release
from conftest import REPO_ROOT, network, released_state_dict

TIMM_NAMES = {"OneShot": "oneshot", "ShuffleNetV2.Large": "shufflenetv2_large",
              "ShuffleNetV2.ExLarge": "shufflenetv2_exlarge"}


def released_file(folder: Path, model: str, side_heads: bool = False) -> Path:
    """A file laid out as a released one: {'state_dict': ...}, `module.` prefixes, both SE names, no side heads."""
    state = {"module." + k: v for k, v in released_state_dict(model).items()
             if side_heads or not k.startswith("predict_")}
    path = folder / f"{TIMM_NAMES[model]}.pth.tar"
    torch.save({"state_dict": state}, path)
    return path


def test_torch_hub_load_from_a_fresh_clone(tmp_path):
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    weights = released_file(tmp_path, "OneShot")
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (90, 60), (200, 30, 40)).save(image)
    script = f"""
import json, torch
from PIL import Image
model = torch.hub.load({str(clone)!r}, "oneshot", source="local", weights={str(weights)!r})
x = model.transforms()(Image.open({str(image)!r}))
logits = model(x.unsqueeze(0))
few = torch.hub.load({str(clone)!r}, "oneshot", source="local", weights={str(weights)!r}, num_classes=4)
print(json.dumps({{"training": model.training, "shape": list(x.shape), "logits": logits[0].tolist(),
                  "format": model.input_format.describe(), "few": few(x.unsqueeze(0)).shape[1],
                  "module": model.__class__.__module__}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["training"] is False and out["shape"] == [3, 224, 224] and out["format"] == "BGR 0..255"
    assert out["few"] == 4 and "re-initialised classifier" in result.stdout

    # The same image through eval.py's loading and preprocessing gives the same logits.
    from common.data import EvalTransform, open_image
    model = network("OneShot").create_network().eval()
    load_model_state(model, weights)
    pixels = EvalTransform(224)(open_image(str(image))).unsqueeze(0)
    with torch.no_grad():
        expected = model(Preprocess(model.input_format)(pixels))[0]
    assert torch.allclose(torch.tensor(out["logits"]), expected, atol=1e-4)


def test_hub_pretrained_without_weights_says_nothing_is_downloaded(tmp_path):
    weights = str(released_file(tmp_path, "OneShot"))
    model = torch.hub.load(str(REPO_ROOT), "oneshot", source="local", weights=weights, pretrained=True)
    assert model.training is False
    with pytest.raises(ValueError, match="nothing is downloaded here: pass weights=PATH"):
        torch.hub.load(str(REPO_ROOT), "shufflenetv2_large", source="local", pretrained=True)


def test_a_file_of_another_network_is_named_as_such_by_hub_and_timm(tmp_path):
    path = tmp_path / "oneshot.safetensors"
    write_release(path, network("OneShot").create_network(num_classes=3).state_dict(),
                  {"arch": "OneShot", "num_classes": 3})
    message = f"{path}: a OneShot file, not ShuffleNetV2.Large"
    with pytest.raises(UserError, match=message):
        torch.hub.load(str(REPO_ROOT), "shufflenetv2_large", source="local", weights=str(path))
    with pytest.raises(UserError, match=message):
        timm.create_model("shufflenetv2_large", pretrained=True, pretrained_cfg_overlay={"file": str(path)})


def test_a_file_that_is_not_weights_is_refused_in_one_line_by_hub_and_timm(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hi\n")  # timm's own torch.load would fail on it with a bare KeyError from the unpickler
    message = "is not a PyTorch or safetensors weights file"
    with pytest.raises(WeightsFileError, match=message):
        torch.hub.load(str(REPO_ROOT), "oneshot", source="local", weights=str(path))
    with pytest.raises(WeightsFileError, match=message):
        timm.create_model("shufflenetv2_large", pretrained=True, pretrained_cfg_overlay={"file": str(path)})


@pytest.mark.parametrize("model", ["OneShot", "ShuffleNetV2.Large", "ShuffleNetV2.ExLarge"])
def test_timm_create_model_equals_create_network_and_eval_loading(tmp_path, model):
    path = released_file(tmp_path, model)
    created = timm.create_model(TIMM_NAMES[model], pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()
    with torch.device("meta"):
        reference = network(model).create_network()
    reference = reference.to_empty(device="cpu").eval()
    load_model_state(reference, path, for_inference=True)  # what eval.py's load_checkpoint does
    assert {k: v for k, v in created.state_dict().items() if not k.startswith("predict_")}.keys() == \
        {k for k in reference.state_dict() if not k.startswith("predict_")}

    config = timm.data.resolve_model_data_config(created)
    assert config["input_size"] == (3, 224, 224) and config["interpolation"] == "bilinear"
    assert config["crop_pct"] == pytest.approx(224 / 256)
    cfg = created.pretrained_cfg
    assert cfg["num_classes"] == 1000 and cfg["first_conv"] and cfg["classifier"]
    created.get_submodule(cfg["first_conv"])
    created.get_submodule(cfg["classifier"])

    # timm's pipeline ends with ToTensor (0..1 RGB) and Normalize(mean, std): its output into the timm model
    # equals eval.py's input format into the plain network.
    pixels = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = reference(Preprocess(network(model).INPUT_FORMAT)(pixels))
        theirs = created((pixels.float() / 255 - mean) / std)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * ours.abs().max().item())
    assert torch.allclose(created(Preprocess(created.input_format)(pixels)), theirs, atol=1e-4)


def test_timm_reads_a_safetensors_release_as_create_model_does(tmp_path):
    path = tmp_path / "oneshot.safetensors"
    write_release(path, network("OneShot").create_network(num_classes=3).state_dict(),
                  {"arch": "OneShot", "num_classes": 3})
    created = timm.create_model("oneshot", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    reference = create_model("OneShot", path).state_dict()
    assert created.num_classes == 3 and created.state_dict().keys() == reference.keys()
    assert all(torch.equal(created.state_dict()[k], v) for k, v in reference.items())
    # Loaded once by the model's own loader, which then lets go of the file's tensors.
    assert not hasattr(created, "load_pretrained") and "state_dict" not in created.pretrained_cfg


def test_a_file_trained_at_another_size_gives_transforms_of_that_size(tmp_path):
    """eval.py crops a checkpoint's images to its --image-size; hub's and timm's preprocessing cropped them to 224."""
    path = tmp_path / "oneshot-64.safetensors"
    write_release(path, network("OneShot").create_network(num_classes=3).state_dict(),
                  {"arch": "OneShot", "num_classes": 3, "image_size": 64})
    image = Image.new("RGB", (120, 90), (20, 200, 40))
    hub = create_model("OneShot", path)
    assert hub.image_size == 64 and hub.transforms()(image).shape == (3, 64, 64)
    assert hub.transforms(96)(image).shape == (3, 96, 96)
    assert create_model("OneShot", path, features_only=True).image_size == 64
    created = timm.create_model("oneshot", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    config = timm.data.resolve_model_data_config(created)
    assert config["input_size"] == (3, 64, 64) and created.transforms()(image).shape == (3, 64, 64)
    assert timm.data.create_transform(**config)(image).shape == (3, 64, 64)
    released = create_model("OneShot", released_file(tmp_path, "OneShot"))
    assert released.image_size == 224 and released.transforms()(image).shape == (3, 224, 224)


def test_timm_features_only_and_another_class_count(tmp_path):
    path = released_file(tmp_path, "OneShot")
    features = timm.create_model("oneshot", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                 features_only=True, out_indices=(1, 2, 3)).eval()
    assert features.feature_info.channels() == [160, 320, 640]
    assert features.feature_info.reduction() == [8, 16, 32]
    # Pruned as timm prunes its own models (prune_intermediate_layers): no classifier, head conv or unused stage left
    assert {key.split(".")[1] for key in features.state_dict()} == {"first_conv", "features"}  # keys: model.<...>
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        outputs = features(x)
    assert [tuple(o.shape) for o in outputs] == [(1, 160, 12, 12), (1, 320, 6, 6), (1, 640, 3, 3)]
    few = timm.create_model("oneshot", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=5)
    assert few.eval()(x).shape == (1, 5)
    state = released_state_dict("OneShot")
    assert all(torch.equal(few.state_dict()[k], state[k]) for k in few.state_dict() if not k.startswith("classifier"))


@pytest.mark.parametrize("model", ["oneshot", "shufflenetv2_large"])
def test_no_classes_gives_the_pooled_features_as_timm_does(tmp_path, model):
    """timm's num_classes=0 built a Linear of 0 outputs (with a warning) and returned N x 0."""
    path = released_file(tmp_path, "OneShot") if model == "oneshot" else None
    weights = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}} if path else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = timm.create_model(model, num_classes=0, **weights).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = backbone(x)
        assert pooled.shape == (2, backbone.num_features) and backbone.num_classes == 0
        assert torch.equal(pooled, backbone.forward_head(backbone.forward_features(x), pre_logits=True))
    if path:
        state = released_state_dict("OneShot")
        assert all(torch.equal(tensor, state[key]) for key, tensor in backbone.state_dict().items())
        assert create_model("oneshot", weights=path, num_classes=0)(x).shape == (2, 1024)
    assert network("ShuffleNetV2.ExLarge").create_network(num_classes=0).get_classifier().__class__ is torch.nn.Identity


def test_global_pool_empty_gives_the_feature_map_as_timm_does(tmp_path):
    """timm's way to an unpooled backbone (num_classes=0, global_pool="") was refused, and a features_only model
    asked for a stage that does not exist failed with an IndexError inside timm."""
    path = released_file(tmp_path, "OneShot")
    backbone = timm.create_model("oneshot", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                 num_classes=0, global_pool="").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(backbone(x), backbone.forward_features(x)) and backbone(x).shape == (1, 1024, 3, 3)
        backbone.reset_classifier(0, "avg")
        assert backbone(x).shape == (1, 1024)
    state = released_state_dict("OneShot")
    assert all(torch.equal(tensor, state[key]) for key, tensor in backbone.state_dict().items())
    classifier = network("ShuffleNetV2.Large").create_network().eval()
    classifier.reset_classifier(0, "")
    with torch.no_grad():
        assert classifier(torch.randn(1, 3, 64, 64)).shape == (1, 1280, 2, 2)
    with pytest.raises(ValueError, match="global_pool '' gives the feature map, which has no classifier"):
        timm.create_model("oneshot", global_pool="")
    with pytest.raises(ValueError, match="global_pool 'max': these networks pool by average"):
        timm.create_model("oneshot", num_classes=0, global_pool="max")
    with pytest.raises(ValueError, match="stage index 4: choose from 0 to 3"):
        timm.create_model("oneshot", features_only=True, out_indices=(1, 4))
    with pytest.raises(ValueError, match="num_classes -1: give 0"):
        timm.create_model("oneshot", num_classes=-1)


def test_timm_train_scripts_create_model_call_is_accepted():
    """timm's train.py passes drop_rate (0.0 by default) and its None-valued options to every model: drop_rate was
    an unexpected keyword, so these networks could not be trained with it."""
    model = timm.create_model("shufflenetv2_large", pretrained=False, in_chans=3, num_classes=None, drop_rate=0.0,
                              drop_path_rate=None, drop_block_rate=None, global_pool=None, bn_momentum=None,
                              bn_eps=None, scriptable=False, checkpoint_path="")
    assert model.dropout.p == 0.0 and model.num_classes == 1000
    assert timm.create_model("oneshot").dropout.p == 0.1  # the original rate unless drop_rate is given
    assert timm.create_model("oneshot", drop_rate=0.3).dropout.p == 0.3
    with pytest.raises(ValueError, match="drop_path_rate 0.1: these networks have no stochastic depth"):
        timm.create_model("oneshot", drop_path_rate=0.1)


def test_timm_large_gives_one_output_in_training_unless_side_heads_are_asked_for(tmp_path):
    """In training mode Large returned (logits, 3 side heads), which timm's training and losses cannot take."""
    path = released_file(tmp_path, "ShuffleNetV2.Large", side_heads=True)
    overlay = {"pretrained_cfg_overlay": {"file": str(path)}}
    x = torch.randn(2, 3, 64, 64)
    plain = timm.create_model("shufflenetv2_large", pretrained=True, **overlay).train()
    assert plain(x).shape == (2, 1000) and not any(k.startswith("predict_") for k in plain.state_dict())
    assert sum(p.numel() for p in plain.parameters()) == 125_120_936
    recipe = timm.create_model("shufflenetv2_large", pretrained=True, side_heads=True, **overlay)
    state = released_state_dict("ShuffleNetV2.Large")
    assert all(torch.equal(tensor, state[key]) for key, tensor in recipe.state_dict().items())
    with torch.no_grad():
        assert torch.equal(timm.create_model("shufflenetv2_large", pretrained=True, **overlay).eval()(x),
                           recipe.eval()(x))
    outputs = recipe.train()(x)
    assert isinstance(outputs, tuple) and len(outputs) == 4
