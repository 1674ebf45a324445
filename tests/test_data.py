"""The data pipeline: folder errors, corrupt files, the resumable stream, the OpenCV-style eval resize, loaders."""
from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageFile, ImageOps

from common.data import (DataError, EvalTransform, ImageDataset, StreamSampler, TrainTransform,
                         build_eval_loader, build_train_loader, center_crop, collate_skip_corrupt, decode_rgb_array,
                         evaluation_order, open_image, scan_image_folder, short_side_size)
from common.demo_data import make_image_folder
from common.errors import UserError

CROP = 32


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A decoded JPEG of the given size with smooth regions and edges, as H x W x 3 uint8 RGB."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return np.array(Image.open(buffer).convert("RGB"))


def batches(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# Folders


@pytest.mark.parametrize("make, expected", [
    (lambda root: None, "no such folder"),
    (lambda root: root.write_text("x"), "not a folder"),
    (lambda root: root.mkdir(), "has no class sub-folders"),
    (lambda root: ((root / "cat").mkdir(parents=True), (root / "cat" / "notes.txt").write_text("x")),
     "class folders hold no images (.jpg, .jpeg, .png"),
])
def test_unusable_folders_give_a_one_line_error_naming_the_flag(tmp_path, make, expected):
    root = tmp_path / "train"
    make(root)
    with pytest.raises(DataError) as caught:
        scan_image_folder(root, "--train-dir")
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert message.startswith(f"--train-dir {root}: ") and expected in message and "\n" not in message
    with pytest.raises(DataError, match="--val-dir"):
        build_eval_loader(root, workers=0)


def test_scan_matches_torchvision_image_folder_and_ignores_hidden_folders(image_folder, tmp_path):
    samples, classes = scan_image_folder(image_folder)
    reference = torchvision.datasets.ImageFolder(str(image_folder))
    assert classes == reference.classes and samples == reference.samples

    root = shutil.copytree(image_folder, tmp_path / "copy")
    (root / ".ipynb_checkpoints").mkdir()
    assert scan_image_folder(root)[1] == classes

    # Sub-folders, a class folder that is a link to images elsewhere, upper-case extensions, other files.
    (root / ".ipynb_checkpoints").rmdir()  # torchvision would take it for a class
    first, second = classes[:2]
    (root / first / "more").mkdir()
    shutil.copy(next((root / first).glob("*.jpg")), root / first / "more" / "EXTRA.JPG")
    (root / first / "notes.txt").write_text("not an image\n")
    shutil.move(root / second, tmp_path / "elsewhere")
    (root / second).symlink_to(tmp_path / "elsewhere")
    reference = torchvision.datasets.ImageFolder(str(root))
    assert scan_image_folder(root) == (reference.samples, reference.classes)

    # A class folder without images is refused, as torchvision refuses it: its label would be taught nothing.
    (root / "zebra" / "notes").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="zebra"):
        torchvision.datasets.ImageFolder(str(root))
    with pytest.raises(DataError) as caught:
        scan_image_folder(root, "--train-dir")
    assert str(caught.value) == (f"--train-dir {root}: 1 class folder(s) hold no images (zebra); put images in them "
                                 "or remove them")


def test_a_link_back_to_a_folder_already_read_is_refused(image_folder, tmp_path):
    """torchvision follows a link to an ancestor 40 levels deep: 6 images became 246 samples, the other classes'
    under the linking class's label."""
    root = shutil.copytree(image_folder, tmp_path / "copy")
    first = sorted(p.name for p in root.iterdir())[0]
    (root / first / "loop").symlink_to("..")
    with pytest.raises(DataError) as caught:
        scan_image_folder(root)
    assert str(caught.value) == (f"--train-dir {root}: {root / first / 'loop' / first} is {root / first} again (a "
                                 "symbolic link back to it), so its images would be read twice, under this class's "
                                 "label; remove the link")


def test_a_link_to_another_class_and_hidden_folders(image_folder, tmp_path):
    """A class folder linked to another's read its images under two labels; a notebook's .ipynb_checkpoints inside
    a class folder was read as images of that class, though hidden class folders were left out."""
    root = shutil.copytree(image_folder, tmp_path / "copy")
    first, second = sorted(p.name for p in root.iterdir())[:2]
    hidden = root / first / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(next((root / first).glob("*.jpg")), hidden / "copy.jpg")
    shutil.copy(next((root / first).glob("*.jpg")), root / first / "._macos_copy.jpg")
    samples, _ = scan_image_folder(root)
    assert len(samples) == len(scan_image_folder(image_folder)[0])
    assert not [path for path, _ in samples if "/." in path]
    (root / "zz_link").symlink_to(root / second)
    with pytest.raises(DataError) as caught:
        scan_image_folder(root)
    assert str(caught.value) == (f"--train-dir {root}: {root / 'zz_link'} is {root / second} again (a symbolic link "
                                 "to it), so its images would be read twice, under this class's label; remove the "
                                 "link")


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_exif_orientation_turns_training_and_eval_images_upright(tmp_path, suffix):
    """Phones store photos sideways with an EXIF orientation; eval.py and train.py read them sideways (predict.py
    upright). Every orientation, at full and reduced JPEG size, gives what PIL's exif_transpose gives."""
    stored = Image.fromarray(photo(80, 48)).resize((80, 48))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"turned{orientation}.{suffix}"
        stored.save(path, exif=exif.tobytes(), **({"quality": 100, "subsampling": 0} if suffix == "jpg" else {}))
        expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        image = open_image(str(path))
        assert (image.height, image.width) == expected.shape[:2]
        assert np.array_equal(decode_rgb_array(image), expected), orientation
        if suffix == "jpg":
            half = decode_rgb_array(image, at_least=(expected.shape[0] // 2, expected.shape[1] // 2))
            assert half.shape == (expected.shape[0] // 2, expected.shape[1] // 2, 3)
        assert TrainTransform(CROP)(image, seed=orientation).shape == (3, CROP, CROP)


def test_16_bit_grey_images_keep_their_levels(tmp_path):
    """PIL's conversion of 16-bit grey levels to RGB clips them at 255: a gradient came out almost all white."""
    levels = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    pixels = decode_rgb_array(open_image(str(path)))
    assert pixels.shape == (32, 32, 3) and np.array_equal(pixels[..., 0], (levels >> 8).astype(np.uint8))
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_forced_label_mapping(image_folder):
    names = ["aaa_first", *sorted(p.name for p in image_folder.iterdir())]
    mapping = {name: index for index, name in enumerate(names)}
    samples, classes = scan_image_folder(image_folder, "--val-dir", class_to_index=mapping)
    assert classes == names
    assert {label for _, label in samples} == {1, 2, 3}
    with pytest.raises(DataError, match=r"--val-dir .*: 2 class folder\(s\) not in the label set"):
        scan_image_folder(image_folder, "--val-dir", class_to_index={names[1]: 0})


# ---------------------------------------------------------------------------------------------------------------
# Corrupt files


@pytest.fixture
def folder_with_corrupt_files(tmp_path):
    root = make_image_folder(tmp_path / "train", num_classes=2, images_per_class=5, size=40)
    good = (root / "red_disc" / "red_disc_0000.jpg").read_bytes()
    (root / "green_square" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "green_square" / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
    return root


def test_corrupt_files_are_skipped_with_a_warning_even_if_truncated_loading_was_enabled(
        folder_with_corrupt_files, caplog, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    samples, _ = scan_image_folder(folder_with_corrupt_files)
    dataset = ImageDataset(samples, TrainTransform(CROP))
    with caplog.at_level(logging.WARNING, logger="common.data"):
        items = [dataset[(i, 7)] for i in range(len(dataset))]
    corrupt = [samples[i][0] for i, item in enumerate(items) if item is None]
    assert sorted(p.rsplit("/", 1)[1] for p in corrupt) == ["not_an_image.jpg", "truncated.jpg"]
    assert all(any(p in record.getMessage() for record in caplog.records) for p in corrupt)
    images, labels, skipped = collate_skip_corrupt(items)
    assert skipped == 2 and images.shape == (10, 3, CROP, CROP) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [s[1] for s, it in zip(samples, items) if it]
    empty = collate_skip_corrupt([None, None], image_shape=(3, CROP, CROP))
    assert empty[0].shape == (0, 3, CROP, CROP) and empty[1].shape == (0,) and empty[2] == 2


def test_train_loader_with_workers_counts_skipped_images_and_keeps_the_rest(folder_with_corrupt_files):
    loader, classes = build_train_loader(folder_with_corrupt_files, crop_size=CROP, global_batch_size=6, seed=3,
                                         workers=2)
    assert classes == ["green_square", "red_disc"]
    got = batches(loader, 4)  # two epochs of 12 samples
    assert sum(skipped for _, _, skipped in got) == 4
    assert sum(len(labels) for _, labels, _ in got) == 20
    assert all(images.shape == (6 - skipped, 3, CROP, CROP) for images, _, skipped in got)
    assert torch.cat([labels for _, labels, _ in got]).bincount().tolist() == [10, 10]


# ---------------------------------------------------------------------------------------------------------------
# The stream


def test_dataset_paths_round_trip_and_one_long_path_does_not_pad_the_others():
    """A forked worker shares the paths: they are kept packed, so memory follows their total length, not the longest
    times their number (a fixed-width array of these would take about 40 MB)."""
    import tracemalloc

    samples = [(f"/data/train/n{i % 100:08d}/img_{i}.JPEG", i % 100) for i in range(10_000)]
    samples[3] = ("/data/" + "deep/" * 800 + "x.JPEG", 5)
    samples[4] = ("/data/train/caf\u00e9/\u5199\u771f.jpg", 6)
    tracemalloc.start()
    try:
        dataset = ImageDataset(samples, EvalTransform())
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert [dataset.path(i) for i in range(len(samples))] == [path for path, _ in samples]
    assert held < 5e6


def test_stream_reads_each_sample_once_per_epoch_and_depends_on_the_seed():
    sampler = StreamSampler(10, 4, seed=1)
    indices = [index for batch in batches(sampler, 5) for index, _ in batch]
    assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:20]) == list(range(10))
    assert indices[:10] != indices[10:20] and indices[:10] != list(range(10))
    other = [index for batch in batches(StreamSampler(10, 4, seed=2), 5) for index, _ in batch]
    assert other != indices
    seeds = [seed for batch in batches(sampler, 5) for _, seed in batch]
    assert len(set(seeds)) == 20


def test_stream_is_the_same_when_resumed_and_whatever_the_world_size():
    whole = batches(StreamSampler(7, 6, seed=5), 6)
    assert batches(StreamSampler(7, 6, seed=5, start_iteration=4), 2) == whole[4:]
    for world_size in (2, 3):
        ranks = [batches(StreamSampler(7, 6, seed=5, rank=r, world_size=world_size), 6) for r in range(world_size)]
        assert [sum((rank[t] for rank in ranks), []) for t in range(6)] == whole
    with pytest.raises(DataError, match="--batch-size 6: .* 4 ranks"):
        StreamSampler(7, 6, seed=5, world_size=4)


def test_train_batches_resumed_or_split_across_ranks_hold_the_same_pixels(image_folder):
    # 24 images, global batch 10: iteration 2 straddles the first epoch boundary.
    options = dict(crop_size=CROP, global_batch_size=10, seed=11)
    loader, _ = build_train_loader(image_folder, workers=2, **options)
    whole = batches(loader, 5)
    resumed, _ = build_train_loader(image_folder, workers=0, start_iteration=2, **options)
    for (images, labels, skipped), (ref_images, ref_labels, _) in zip(batches(resumed, 3), whole[2:]):
        assert skipped == 0 and torch.equal(labels, ref_labels) and torch.equal(images, ref_images)
    halves = [batches(build_train_loader(image_folder, workers=0, rank=r, world_size=2, **options)[0], 5)
              for r in range(2)]
    for t, (ref_images, ref_labels, _) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][t][0], halves[1][t][0]]), ref_images)
        assert torch.equal(torch.cat([halves[0][t][1], halves[1][t][1]]), ref_labels)
    loader.batch_sampler.start_iteration = 3  # resume without rescanning: persistent workers restart there
    assert torch.equal(next(iter(loader))[0], whole[3][0])
    other, _ = build_train_loader(image_folder, workers=0, **{**options, "seed": 12})
    assert not torch.equal(next(iter(other))[0], whole[0][0])


def test_batches_are_channels_last_and_preprocess_gives_the_layout_asked(image_folder):
    """Workers never transpose pixels: batches keep the transforms' H x W x 3 memory, and Preprocess makes the
    network's input in the layout the network runs in (NCHW unless asked), so an NCHW network is not silently run
    channels_last."""
    from common.input_format import InputFormat, Preprocess
    images, _, _ = next(iter(build_train_loader(image_folder, crop_size=CROP, global_batch_size=4, seed=0,
                                                workers=0)[0]))
    evaluated = next(iter(build_eval_loader(image_folder, crop_size=CROP, batch_size=4, workers=0)[0]))[0]
    preprocess = Preprocess(InputFormat(channel_order="BGR", mean=(1.0, 2.0, 3.0), std=(2.0, 3.0, 4.0)))
    for batch in (images, evaluated):
        assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
        standard = preprocess(batch)
        assert standard.is_contiguous()
        assert torch.equal(standard, preprocess(batch.contiguous()))
        channels_last = preprocess(batch, torch.channels_last)
        assert channels_last.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(channels_last, standard)


def test_train_transform_output_and_determinism():
    image = Image.fromarray(photo(97, 61))
    transform = TrainTransform(CROP)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    assert torch.equal(transform(image), first)
    assert first.shape == (3, CROP, CROP) and first.dtype == torch.uint8
    assert first.permute(1, 2, 0).is_contiguous()  # H x W x 3 memory, stacked into a channels_last batch
    assert not torch.equal(transform(image), first)
    assert transform(image.convert("L")).shape == (3, CROP, CROP)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (97, 61), (61, 97), (333, 257), (301, 301),
                                           (160, 120), (1001, 667), (513, 512)])
def test_eval_transform_is_the_original_opencv_resize_and_center_crop(width, height):
    cv2 = pytest.importorskip("cv2")
    pixels = photo(width, height, seed=width)
    # The original scripts' OpencvResize(256): the long side int(256 * long / short + 0.5), cv2's default bilinear.
    short, long = min(width, height), max(width, height)
    new_long = int(256 * long / short + 0.5)
    expected_size = (256, new_long) if height < width else (new_long, 256)
    assert short_side_size(height, width, 256) == expected_size
    resized = torch.from_numpy(cv2.resize(pixels, expected_size[::-1])).permute(2, 0, 1)
    reference = torchvision.transforms.functional.center_crop(resized, [224, 224])
    for image in (Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1)):
        out = EvalTransform(224)(image)
        assert out.dtype == torch.uint8 and torch.equal(out, reference)


def test_long_side_rounds_half_up_as_the_original():
    assert short_side_size(512, 513, 256) == (256, 257)  # 256.5: Python's round() would give 256
    assert short_side_size(375, 500, 256) == (256, 341)
    assert short_side_size(500, 375, 256) == (341, 256)


@pytest.mark.parametrize("crop, resize", [(224, 256), (192, 219), (160, 183), (320, 366)])
def test_eval_transform_shapes_and_center_crop_offsets(crop, resize):
    transform = EvalTransform(crop)
    assert transform.resize_size == resize
    out = transform(Image.fromarray(photo(333, 257)))
    assert out.shape == (3, crop, crop) and out.dtype == torch.uint8
    for height, width in ((257, 333), (256, 341), (300, 300), (301, 225)):
        image = torch.arange(height * width).view(1, height, width)
        expected = torchvision.transforms.functional.center_crop(image, [224, 224])
        assert torch.equal(center_crop(image, 224), expected)


def test_eval_order_is_fixed_limit_spreads_across_classes_and_ranks_share_it(image_folder):
    loader, classes, paths = build_eval_loader(image_folder, crop_size=CROP, batch_size=4, workers=0)
    assert paths == build_eval_loader(image_folder, crop_size=CROP, workers=0)[2]
    samples, _ = scan_image_folder(image_folder)
    assert sorted(paths) == sorted(p for p, _ in samples) and paths != [p for p, _ in samples]
    label_of = dict(samples)
    images, labels, skipped, indices = next(iter(loader))
    assert images.shape == (4, 3, CROP, CROP) and skipped == 0 and indices.tolist() == [0, 1, 2, 3]
    assert labels.tolist() == [label_of[paths[i]] for i in indices]

    loader, _, limited = build_eval_loader(image_folder, crop_size=CROP, limit=6, workers=0)
    assert limited == paths[:6] and sorted(label_of[p] for p in limited) == [0, 0, 1, 1, 2, 2]
    assert len(classes) == 3

    labels = [0] * 5 + [1] * 2 + [3] * 9
    order = evaluation_order(labels)
    assert sorted(order.tolist()) == list(range(16)) and np.array_equal(order, evaluation_order(labels))
    dealt = [labels[i] for i in order]
    assert sorted(dealt[:6]) == [0, 0, 1, 1, 3, 3] and sorted(dealt[6:12]) == [0, 0, 0, 3, 3, 3]

    shards = [build_eval_loader(image_folder, crop_size=CROP, batch_size=5, limit=9, rank=r, world_size=2,
                                workers=0)[0] for r in range(2)]
    positions = [torch.cat([batch[3] for batch in shard]).tolist() for shard in shards]
    assert positions == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    with pytest.raises(DataError, match="--limit 0"):
        build_eval_loader(image_folder, limit=0, workers=0)
