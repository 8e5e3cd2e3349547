from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from finetune.data.folders import image_folder, load_splits
from finetune.data.images import load_rgb
from finetune.data.loader import EpochSampler, SeededDataset
from finetune.data.presets import EvalPreset, ModelInput, TrainPreset
from finetune.errors import UserError


def save_mode(path: Path, mode: str) -> Path:
    gradient = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    if mode == "I;16":
        img = Image.fromarray(gradient.astype(np.uint16) * 257)  # 16-bit: full range is 0..65535
    elif mode == "P-transparent":
        img = Image.fromarray(gradient).convert("P")
        img.info["transparency"] = 255  # an index the gradient does not use
    elif mode == "CMYK":
        img = Image.fromarray(np.stack([gradient] * 3, axis=-1)).convert("CMYK")
    else:
        img = Image.fromarray(gradient).convert(mode)
    img.save(path)
    return path


@pytest.mark.parametrize("mode, ext", [("L", ".png"), ("LA", ".png"), ("P-transparent", ".png"), ("RGBA", ".png"),
                                       ("CMYK", ".jpg"), ("I;16", ".png"), ("RGB", ".JPG")])
def test_every_mode_loads_as_8bit_rgb(tmp_path: Path, mode: str, ext: str):
    img = load_rgb(str(save_mode(tmp_path / f"x{ext}", mode)))
    assert img.mode == "RGB" and img.size == (16, 16)
    arr = np.asarray(img)
    # The gradient survives: dark on the left, bright on the right (16-bit is scaled, not clipped).
    assert arr[:, 0].mean() < 40 and arr[:, -1].mean() > 200


def test_transparency_is_white_not_hidden_colour(tmp_path: Path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    assert np.asarray(load_rgb(str(tmp_path / "t.png"))).min() == 255


def test_undecodable_image_names_the_file(tmp_path: Path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=r"cannot decode image .*bad\.jpg"):
        load_rgb(str(tmp_path / "bad.jpg"))


def test_test_classes_are_indexed_by_the_train_list(tmp_path: Path):
    write_image_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    write_image_folder(tmp_path / "test", {"a": 1, "c": 1})
    splits = load_splits(tmp_path)
    assert splits.classes == ["a", "b", "c"]
    assert sorted(splits.test.targets) == [0, 2]  # 'c' keeps label 2 although test lacks 'b'
    assert splits.warnings == [f"class 'b' has no images in {tmp_path / 'test'}"]


def test_val_folder_is_used_when_there_is_no_test(tmp_path: Path):
    write_image_folder(tmp_path / "train", {"a": 2, "b": 2})
    write_image_folder(tmp_path / "val", {"a": 1, "b": 1})
    assert load_splits(tmp_path).test.root == str(tmp_path / "val")


def test_hidden_folders_are_not_classes(tmp_path: Path):
    """Editors and notebooks leave folders such as .ipynb_checkpoints: empty or not, in train or
    test, they are neither a class nor an empty class."""
    write_image_folder(tmp_path / "train", {"a": 2, "b": 2})
    write_image_folder(tmp_path / "test", {"a": 1, "b": 1})
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    write_image_folder(tmp_path / "test", {".cache": 1})
    splits = load_splits(tmp_path)
    assert splits.classes == ["a", "b"] and splits.test.classes == ["a", "b"]
    assert sorted(splits.test.targets) == [0, 1] and splits.warnings == []


@pytest.mark.parametrize("layout, message", [
    ("missing", "data folder not found"),
    ("no-train", "has no train/ folder"),
    ("no-test", r"has no test/ \(or val/\) folder"),
    ("flat", "has no class sub-folders"),
    ("empty-class", "class 'b' in .* has no images"),
    ("extra-test-class", "classes the training set lacks: zebra"),
])
def test_bad_layouts_are_one_clear_error(tmp_path: Path, layout: str, message: str):
    data = tmp_path / "data"
    if layout != "missing":
        write_image_folder(data / "train", {"a": 2, "b": 2})
        write_image_folder(data / "test", {"a": 1, "b": 1})
    if layout == "no-train":
        (data / "train").rename(data / "training")
    elif layout == "no-test":
        (data / "test").rename(data / "testing")
    elif layout == "flat":
        for p in (data / "train").rglob("*.png"):
            p.rename(data / "train" / f"{p.parent.name}{p.name}")
        for d in ("a", "b"):
            (data / "train" / d).rmdir()
    elif layout == "empty-class":
        for p in (data / "train" / "b").iterdir():
            p.unlink()
    elif layout == "extra-test-class":
        write_image_folder(data / "test", {"zebra": 1})
    with pytest.raises(UserError, match=message):
        load_splits(data)


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path: Path):
    ds = image_folder(write_image_folder(tmp_path / "train", {"a": 3, "b": 3}, size=24))
    seeded = SeededDataset(ds, TrainPreset(size=16), seed=1)
    torch.manual_seed(123)
    first = seeded[(0, 4)][0]
    torch.manual_seed(999)  # the global RNG does not matter, and it is left alone
    state = torch.get_rng_state()
    assert torch.equal(seeded[(0, 4)][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(seeded[(1, 4)][0], first)
    assert not torch.equal(SeededDataset(ds, TrainPreset(size=16), seed=2)[(0, 4)][0], first)


def test_presets_produce_uint8_crops_and_model_input_normalises(tmp_path: Path):
    Image.fromarray(np.full((30, 40, 3), 128, dtype=np.uint8)).save(tmp_path / "x.png")
    for preset in (TrainPreset(size=16), EvalPreset(crop_size=16, resize_size=18)):
        out = preset(str(tmp_path / "x.png"))
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8 and (out == 128).all()
    x = ModelInput((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=True)(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.full_like(x, 2.0))
    assert x.is_contiguous(memory_format=torch.channels_last)


def photo(path: Path, width: int, height: int, orientation: int = 1) -> Path:
    """A smooth photo-like JPEG: gradients with a bright square near the top-left corner."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], axis=-1)
    rgb[height // 10:height // 4, width // 10:width // 4] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb.astype(np.uint8)).save(path, quality=95, exif=exif)
    return path


def test_large_jpegs_decode_at_reduced_scale_and_look_the_same(tmp_path: Path):
    big = photo(tmp_path / "big.jpg", 3000, 2000)
    preset = EvalPreset(crop_size=224, resize_size=256)
    fast = preset(str(big)).float()
    # The reference: a full-size decode, then the same resize and crop.
    from torchvision.transforms.v2 import functional as F
    full = F.pil_to_tensor(F.center_crop(F.resize(load_rgb(str(big)), 256, antialias=True), [224, 224])).float()
    assert (fast - full).abs().mean() < 2.0  # resampling differences only, on a 0-255 scale
    assert load_rgb(str(big), reduce_to=(375, 250)).size == (375, 250)  # 1/8 scale covers it
    assert load_rgb(str(big), reduce_to=(384, 256)).size == (750, 500)  # 1/8 would not: 1/4


def test_exif_rotated_jpeg_keeps_its_orientation_under_reduced_decoding(tmp_path: Path):
    rotated = photo(tmp_path / "r.jpg", 1200, 800, orientation=6)  # shown 800 wide, 1200 high
    img = load_rgb(str(rotated), reduce_to=(200, 300))
    assert img.size == (200, 300)
    torch.manual_seed(0)
    out = TrainPreset(size=64, scale=(1.0, 1.0), ratio=(2 / 3, 2 / 3), hflip_prob=0.0)(str(rotated))
    assert out.shape == (3, 64, 64)


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    keys = list(s)
    assert [e for e, _ in keys] == [2] * 10 and sorted(i for _, i in keys) == list(range(10))
    again = EpochSampler(10, seed=3)
    again.set_epoch(2)
    assert list(again) == keys
    assert s.order(2) != s.order(3)


def test_an_epoch_never_ends_on_a_batch_of_one():
    """33 images at a global batch of 32 left BatchNorm one image: the run died with a ValueError."""
    lone = EpochSampler(33, seed=3, global_batch=32)
    assert len(lone) == 32 and lone.leaves_out_one
    left_out = set()
    for epoch in range(4):
        lone.set_epoch(epoch)
        keys = [i for _, i in lone]
        assert len(keys) == 32 and keys == lone.order(epoch)[:32]  # a function of (seed, epoch): resumable
        left_out |= set(range(33)) - set(keys)
    assert len(left_out) > 1  # a different image each epoch, not one never seen
    assert len(EpochSampler(34, seed=3, global_batch=32)) == 34  # a last batch of two is kept
    assert len(EpochSampler(33, seed=3)) == 33  # no BatchNorm that trains: every image


def test_a_last_batch_of_one_trains(tmp_path: Path):
    import contextlib
    import io

    from conftest import FAST, write_image_folder

    import train

    data = tmp_path / "data"
    write_image_folder(data / "train", {"a": 9, "b": 8})  # 17 = 2 x 8 + 1
    write_image_folder(data / "test", {"a": 2, "b": 2}, seed=1)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train.main(["--data", str(data), "--output-dir", str(tmp_path / "run"), *FAST])
    assert len(result.history) == 1
    assert "each epoch leaves out the last image of its shuffled order" in out.getvalue()


def test_every_format_pillow_opens_is_loaded_and_other_files_are_named(tmp_path: Path):
    """.gif and .avif were ignored without a word: a class of GIFs was 'empty'."""
    import numpy as np
    from PIL import Image

    from finetune.data.images import load_rgb

    data = tmp_path / "data"
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for split in ("train", "test"):
        (data / split / "gifs").mkdir(parents=True)
        (data / split / "mixed").mkdir(parents=True)
        Image.fromarray(pixels).convert("P").save(data / split / "gifs" / "a.gif")
        Image.fromarray(pixels).save(data / split / "mixed" / "b.avif")
        Image.fromarray(pixels).save(data / split / "mixed" / "c.png")
    (data / "train" / "mixed" / "notes.txt").write_text("not an image")
    (data / "train" / "mixed" / ".DS_Store").write_bytes(b"\0")
    splits = load_splits(data)
    assert len(splits.train) == 3 and len(splits.test) == 3
    assert load_rgb(str(data / "train" / "mixed" / "b.avif")).size == (16, 16)
    assert [n for n in splits.warnings if "left out 1 file(s)" in n and ".txt x1" in n and "notes.txt" in n]

    (data / "train" / "texts").mkdir()
    (data / "train" / "texts" / "x.heic").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match=r"class 'texts' .* has no images \(1 file\(s\) of types Pillow cannot open: .heic x1\)"):
        load_splits(data)
def test_each_augmentation_choice_builds_its_preset(tmp_path: Path):
    from finetune.data.presets import EvalPreset, Preprocessing, RandomCropPreset, train_preset

    pre = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3)
    assert train_preset("classic", pre).scale == (0.08, 1.0)
    assert train_preset("mild", pre).scale == (0.35, 1.0)
    assert train_preset("mild", pre, hflip=False).hflip_prob == 0.0
    assert isinstance(train_preset("crop", pre), RandomCropPreset)
    assert isinstance(train_preset("flip", pre), EvalPreset) and train_preset("flip", pre).hflip_prob == 0.5
    assert train_preset("flip", pre, hflip=False).hflip_prob == 0.0
    assert isinstance(train_preset("none", pre), EvalPreset) and train_preset("none", pre).hflip_prob == 0.0
    # flip: the eval view, mirrored about half the time
    write_image_folder(tmp_path, {"a": 1}, size=40)
    path = str(next(tmp_path.rglob("*.png")))
    view = pre.eval_preset()(path)
    flipped = [torch.equal(train_preset("flip", pre)(path), view.flip(-1)) for _ in range(40)]
    assert 5 < sum(flipped) < 35


@pytest.mark.parametrize("prepared", [False, True])
def test_started_workers_serve_every_later_pass_without_another_fork(tiny_data: Path, prepared: bool):
    """``start_workers`` forks a held-out loader's workers before its first pass (while the
    training process is small); the passes then use those workers, each image once, in order,
    also through Accelerate's wrapper."""
    import multiprocessing

    from accelerate import Accelerator

    from finetune.data.loader import make_eval_loader, start_workers
    from finetune.data.presets import Preprocessing

    test = image_folder(tiny_data / "test")
    pre = Preprocessing(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    loader = make_eval_loader(test, pre, batch_size=4, num_workers=2)
    if prepared:
        loader = Accelerator(cpu=True).prepare(loader)
    before = {p.pid for p in multiprocessing.active_children()}
    start_workers(loader)
    workers = {p.pid for p in multiprocessing.active_children()} - before
    assert len(workers) == 2
    for _ in range(2):
        indices = torch.cat([batch[2] for batch in loader])
        assert indices.tolist() == list(range(len(test)))
        assert {p.pid for p in multiprocessing.active_children()} - before == workers
