"""Tests of the data layer: scanning image folders, splits, images, the demo set."""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PACS, PACS_SPLITS
from fedclip_lightning.data.domains import (
    DATASET_DOMAINS,
    IMAGE_EXTENSIONS,
    DomainSet,
    ImageDataset,
    Sample,
    load_rgb,
    scan_domains,
)
from fedclip_lightning.data.partition import (
    ClientSplit,
    Task,
    leave_one_domain_out,
    official_split,
    random_split,
    stable_seed,
)
from fedclip_lightning.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_DOMAINS,
    default_cache_dir,
    ensure_synthetic_dataset,
)
from fedclip_lightning.errors import DataError

PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
# Which class each PACS_mini domain lacks (see shared/data/README.md).
MINI_LACKS = {"art_painting": "house", "cartoon": "guitar", "photo": "giraffe", "sketch": "person"}


@pytest.fixture
def mini_copy(pacs_mini: Path, tmp_path: Path) -> Path:
    """A writable copy of PACS_mini in tmp_path."""
    dst = tmp_path / "mini"
    shutil.copytree(pacs_mini, dst)
    return dst


@pytest.fixture(scope="module")
def pacs_full() -> DomainSet:
    if not PACS.is_dir():
        pytest.fail(f"{PACS} is missing: the tests need ../shared/data beside the checkout")
    return scan_domains(PACS, check_images=False)


def _class_of(sample: Sample) -> str:
    return Path(sample.path).parent.name


def _paths(samples: list[Sample]) -> list[str]:
    return [s.path for s in samples]


# --------------------------------------------------------------------------- scanning


def test_pacs_mini_vocabulary_and_labels_agree_across_domains(pacs_mini: Path) -> None:
    ds = scan_domains(pacs_mini)
    assert ds.classes == PACS_CLASSES
    assert list(ds.samples) == PACS_DOMAINS
    assert {d: len(s) for d, s in ds.samples.items()} == {d: 10 for d in PACS_DOMAINS}
    assert ds.skipped == []
    assert ds.root == pacs_mini.resolve()
    dog_labels = set()
    for domain, samples in ds.samples.items():
        present = set()
        for s in samples:
            assert os.path.isabs(s.path) and os.path.isfile(s.path)
            assert s.domain == domain
            assert ds.classes[s.label] == _class_of(s)
            assert Path(s.path).relative_to(pacs_mini.resolve()).parts[0] == domain
            present.add(_class_of(s))
            if _class_of(s) == "dog":
                dog_labels.add(s.label)
        assert present == set(PACS_CLASSES) - {MINI_LACKS[domain]}
        rel = [Path(s.path).relative_to(ds.root).as_posix() for s in samples]
        assert rel == sorted(rel)
    assert dog_labels == {PACS_CLASSES.index("dog")}


def test_domain_lacking_a_class_keeps_shared_labels(pacs_mini: Path) -> None:
    alone = scan_domains(pacs_mini, ["art_painting"])
    assert alone.classes == sorted(set(PACS_CLASSES) - {"house"})
    # With photo (which has house but no giraffe) the union is all 7 classes,
    # and the labels are those of the full scan.
    pair = scan_domains(pacs_mini, ["photo", "art_painting"])
    assert list(pair.samples) == ["photo", "art_painting"]
    assert pair.classes == PACS_CLASSES
    full = scan_domains(pacs_mini)
    for d in ("photo", "art_painting"):
        assert pair.samples[d] == full.samples[d]
    house = PACS_CLASSES.index("house")
    assert house in {s.label for s in pair.samples["photo"]}
    assert house not in {s.label for s in pair.samples["art_painting"]}


def test_scan_ignores_hidden_and_non_image_files(mini_copy: Path) -> None:
    (mini_copy / ".hidden_domain" / "dog").mkdir(parents=True)
    (mini_copy / "photo" / "dog" / ".DS_Store").write_bytes(b"junk")
    (mini_copy / "photo" / "dog" / "notes.txt").write_text("not an image")
    (mini_copy / "photo" / ".cache").mkdir()
    src = next((mini_copy / "photo" / "dog").glob("*.jpg"))
    shutil.copy(src, mini_copy / "photo" / "dog" / "UPPER.JPG")
    ds = scan_domains(mini_copy)
    assert list(ds.samples) == PACS_DOMAINS
    names = [Path(p).name for p in _paths(ds.samples["photo"])]
    assert "UPPER.JPG" in names and "notes.txt" not in names and ".DS_Store" not in names
    assert len(ds.samples["photo"]) == 11
    assert ".jpg" in IMAGE_EXTENSIONS and ".tiff" in IMAGE_EXTENSIONS


def test_dataset_presets() -> None:
    assert DATASET_DOMAINS["pacs"] == PACS_DOMAINS
    assert DATASET_DOMAINS["office_home"] == ["Art", "Clipart", "Product", "Real_World"]
    assert len(DATASET_DOMAINS["domainnet"]) == 6 and "VOC2007" in DATASET_DOMAINS["vlcs"]


# --------------------------------------------------------------------------- scan errors


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        scan_domains(tmp_path / "nowhere")
    assert "data.root" in str(err.value) and "nowhere" in str(err.value)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="data.root"):
        scan_domains(tmp_path / "file.txt")


def test_missing_domain_lists_existing(pacs_mini: Path) -> None:
    with pytest.raises(DataError) as err:
        scan_domains(pacs_mini, ["photo", "clipart", "real"])
    msg = str(err.value)
    assert "data.domains" in msg and "clipart" in msg and "real" in msg
    for d in PACS_DOMAINS:
        assert d in msg


def test_empty_domain_is_named(pacs_mini: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for dom in ("full", "other"):
        (root / dom / "dog").mkdir(parents=True)
        for img in sorted((pacs_mini / "photo" / "dog").iterdir())[:1] + sorted((pacs_mini / "cartoon" / "dog").iterdir())[:1]:
            shutil.copy(img, root / dom / "dog" / img.name)
    (root / "bare" / "dog").mkdir(parents=True)
    (root / "bare" / "dog" / "readme.txt").write_text("no images here")
    (root / "bare2").mkdir()
    with pytest.raises(DataError) as err:
        scan_domains(root)
    msg = str(err.value)
    assert "'bare'" in msg and "'bare2'" in msg and "'full'" not in msg and "'other'" not in msg
    assert len(err.value.problems) == 2  # both empty domains in one error
    assert "data.domains" in msg
    ds = scan_domains(root, ["full", "other"])
    assert ds.classes == ["dog"] and len(ds.samples["full"]) == 2


def test_no_class_in_common(pacs_mini: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for dom, cls in (("a", "dog"), ("b", "horse")):
        (root / dom / cls).mkdir(parents=True)
        for img in sorted((pacs_mini / "art_painting" / cls).iterdir())[:1]:
            shutil.copy(img, root / dom / cls / img.name)
    with pytest.raises(DataError) as err:
        scan_domains(root)
    msg = str(err.value)
    assert "data.domains" in msg and "common" in msg and "dog" in msg and "horse" in msg
    assert scan_domains(root, ["a"]).classes == ["dog"]


def test_corrupt_image_error_and_skip(mini_copy: Path) -> None:
    bad = mini_copy / "photo" / "dog" / "x.jpg"
    bad.write_bytes(b"this is not a jpeg" * 20)
    bad_png = mini_copy / "sketch" / "dog" / "y.png"
    good_png = next((mini_copy / "sketch" / "dog").glob("*.png")).read_bytes()
    bad_png.write_bytes(good_png[: len(good_png) // 2] + bytes(len(good_png) // 2))  # damaged data, CRC fails
    with pytest.raises(DataError) as err:
        scan_domains(mini_copy)
    msg = str(err.value)
    assert str(bad.resolve()) in msg and str(bad_png.resolve()) in msg
    assert "data.on_corrupt" in msg and "delete or replace" in msg

    ds = scan_domains(mini_copy, on_corrupt="skip")
    assert sorted(ds.skipped) == sorted([str(bad.resolve()), str(bad_png.resolve())])
    assert len(ds.samples["photo"]) == 10 and len(ds.samples["sketch"]) == 10
    assert str(bad.resolve()) not in _paths(ds.samples["photo"])

    unchecked = scan_domains(mini_copy, check_images=False)
    assert len(unchecked.samples["photo"]) == 11 and unchecked.skipped == []

    with pytest.raises(DataError, match="data.on_corrupt"):
        scan_domains(mini_copy, on_corrupt="ignore")


def test_a_truncated_jpeg_is_caught_before_training(mini_copy: Path) -> None:
    """PIL's verify() passes a JPEG cut short; decoding it fails. The check decodes, so the file is
    refused (or skipped and listed) before any training starts."""
    src = next((mini_copy / "photo" / "dog").glob("*.jpg"))
    data = src.read_bytes()
    cut = mini_copy / "photo" / "dog" / "cut.jpg"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with Image.open(cut) as im:
        im.verify()  # what the check did before: it passes
    with pytest.raises(DataError, match="cut.jpg"):
        scan_domains(mini_copy)
    ds = scan_domains(mini_copy, on_corrupt="skip")
    assert ds.skipped == [str(cut.resolve())]


def test_many_corrupt_images_are_capped(mini_copy: Path) -> None:
    for i in range(25):
        (mini_copy / "cartoon" / "dog" / f"bad{i:02d}.png").write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        scan_domains(mini_copy)
    msg = str(err.value)
    assert "25 corrupt" in msg and "and 5 more" in msg


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16", "1"])
def test_load_rgb_converts_every_mode(tmp_path: Path, mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    if mode == "P":
        img = rgb.convert("P", palette=Image.ADAPTIVE)
    elif mode == "I;16":
        img = Image.fromarray(np.arange(120, dtype=np.uint16).reshape(12, 10) * 500)
    else:
        img = rgb.convert(mode)
    ext = "jpg" if mode == "CMYK" else "png" if mode != "I;16" else "tif"
    path = tmp_path / f"img_{mode.replace(';', '')}.{ext}"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode.startswith(mode[:1])
    out = load_rgb(str(path))
    assert out.mode == "RGB" and out.size == (10, 12)


def test_load_rgb_transparent_pixels_become_white(tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    assert load_rgb(str(path)).getpixel((0, 0)) == (255, 255, 255)


def test_load_rgb_names_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="x.jpg"):
        load_rgb(str(bad))
    with pytest.raises(DataError, match="missing.png"):
        load_rgb(str(tmp_path / "missing.png"))


def test_image_dataset(pacs_mini: Path) -> None:
    ds = scan_domains(pacs_mini, ["sketch"])
    data = ImageDataset(ds.samples["sketch"], transform=lambda im: np.asarray(im).shape)
    assert len(data) == 10
    shape, label = data[0]
    assert shape[2] == 3 and label == ds.samples["sketch"][0].label
    img, _ = ImageDataset(ds.samples["sketch"], None)[1]
    assert isinstance(img, Image.Image) and img.mode == "RGB"


# --------------------------------------------------------------------------- splits


def test_stable_seed_is_stable() -> None:
    assert stable_seed(0, "photo") == stable_seed(0, "photo")
    assert stable_seed(0, "photo") != stable_seed(1, "photo") != stable_seed(0, "sketch")
    assert 0 <= stable_seed("x") < 2**63
    # A fixed value: the same in every process, whatever PYTHONHASHSEED is.
    assert stable_seed(0, "photo") == 4761768803508114935


def test_random_split_seeded_disjoint_covering() -> None:
    items = list(range(101))
    a = random_split(items, seed=3, key="photo")
    assert a == random_split(items, seed=3, key="photo")
    assert a != random_split(items, seed=4, key="photo")
    assert a != random_split(items, seed=3, key="sketch")
    train, val, test = a
    assert (len(train), len(val), len(test)) == (60, 20, 21)
    assert sorted(train + val + test) == items
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert items == list(range(101))  # input untouched
    assert [len(x) for x in random_split(list(range(10)))] == [6, 2, 2]
    assert [len(x) for x in random_split(list(range(10)), (0.8, 0.1, 0.1))] == [8, 1, 1]
    with pytest.raises(DataError, match="data.split.ratios"):
        random_split(items, (0.9, 0.5, 0.1))


def test_leave_one_domain_out(pacs_mini: Path) -> None:
    ds = scan_domains(pacs_mini)
    task = leave_one_domain_out(ds, ["sketch"], seed=0)
    assert isinstance(task, Task) and task.classes == PACS_CLASSES
    assert [c.name for c in task.clients] == ["art_painting", "cartoon", "photo"]
    assert list(task.unseen) == ["sketch"] and task.unseen["sketch"] == ds.samples["sketch"]
    for client in task.clients:
        assert isinstance(client, ClientSplit)
        assert (len(client.train), len(client.val), len(client.test)) == (6, 2, 2)
        parts = [set(_paths(client.train)), set(_paths(client.val)), set(_paths(client.test))]
        assert sum(map(len, parts)) == len(set().union(*parts))
        assert set().union(*parts) == set(_paths(ds.samples[client.name]))
        assert all(s.domain == client.name for s in client.train + client.val + client.test)
    again = leave_one_domain_out(ds, ["sketch"], seed=0)
    assert again == task
    other = leave_one_domain_out(ds, ["sketch"], seed=1)
    assert [c.train for c in other.clients] != [c.train for c in task.clients]
    # A domain's split does not depend on which domain is held out.
    t2 = leave_one_domain_out(ds, ["cartoon"], seed=0)
    assert t2.clients[0] == task.clients[0]
    # No unseen domain: every domain is a client.
    assert len(leave_one_domain_out(ds, []).clients) == 4


def test_leave_one_domain_out_errors(pacs_mini: Path) -> None:
    ds = scan_domains(pacs_mini)
    with pytest.raises(DataError) as err:
        leave_one_domain_out(ds, ["clipart"])
    assert "data.unseen" in str(err.value) and "clipart" in str(err.value) and "art_painting" in str(err.value)
    with pytest.raises(DataError, match="data.unseen"):
        leave_one_domain_out(ds, PACS_DOMAINS)
    tiny = DomainSet(root=ds.root, classes=ds.classes,
                     samples={"photo": ds.samples["photo"], "sketch": ds.samples["sketch"][:2]})
    with pytest.raises(DataError) as err:
        leave_one_domain_out(tiny, [])
    assert "'sketch'" in str(err.value) and "2 images" in str(err.value) and "val" in str(err.value)


def test_official_split_full_pacs(pacs_full: DomainSet) -> None:
    task = official_split(pacs_full, ["sketch"], PACS_SPLITS)
    assert task.classes == PACS_CLASSES
    assert [c.name for c in task.clients] == ["art_painting", "cartoon", "photo"]
    sizes = {c.name: (len(c.train), len(c.val), len(c.test)) for c in task.clients}
    assert sizes == {"art_painting": (1840, 207, 207), "cartoon": (2107, 237, 237), "photo": (1499, 171, 171)}
    assert len(task.unseen["sketch"]) == 3929
    art = task.clients[0]
    counts = Counter(_paths(art.val))
    pic248 = str(pacs_full.root / "art_painting" / "dog" / "pic_248.jpg")
    assert counts[pic248] == 1 and max(counts.values()) == 1
    assert str(pacs_full.root / "art_painting" / "dog" / "pic_249.jpg") not in set(_paths(art.train + art.val))
    for c in task.clients:
        assert c.test == c.val
        assert not set(_paths(c.train)) & set(_paths(c.val))
        for s in c.train + c.val:
            assert pacs_full.classes[s.label] == _class_of(s) and s.domain == c.name
    # Same samples as the scan (same path strings), so they can be compared.
    scanned = set(_paths(pacs_full.samples["photo"]))
    photo = task.clients[2]
    assert set(_paths(photo.train + photo.val)) == scanned


def test_official_split_errors(mini_copy: Path, tmp_path: Path) -> None:
    ds = scan_domains(mini_copy)
    lists = tmp_path / "lists"
    lists.mkdir()
    with pytest.raises(DataError) as err:
        official_split(ds, ["sketch"], lists)
    msg = str(err.value)
    assert "data.split.official_dir" in msg and "photo_train_kfold.txt" in msg and "cartoon_crossval_kfold.txt" in msg
    with pytest.raises(DataError, match="data.split.official_dir"):
        official_split(ds, ["sketch"], tmp_path / "nope")
    with pytest.raises(DataError, match="data.unseen"):
        official_split(ds, ["quickdraw"], lists)

    for d in ("art_painting", "cartoon", "photo"):
        rel = [Path(s.path).relative_to(ds.root).as_posix() for s in ds.samples[d]]
        (lists / f"{d}_train_kfold.txt").write_text("".join(f"{r} 9\n" for r in rel[:7]))
        (lists / f"{d}_crossval_kfold.txt").write_text("".join(f"{r} 9\n" for r in rel[7:] + rel[7:8]))
    task = official_split(ds, ["sketch"], lists)
    assert [(len(c.train), len(c.val)) for c in task.clients] == [(7, 3)] * 3
    gone = Path(ds.samples["photo"][0].path)
    gone.unlink()
    with pytest.raises(DataError) as err:
        official_split(ds, ["sketch"], lists)
    assert str(gone) in str(err.value) and "data.root" in str(err.value)


# --------------------------------------------------------------------------- synthetic


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDCLIP_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FEDCLIP_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "fedclip-lightning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fedclip-lightning"


def test_synthetic_generated_once_and_scans(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDCLIP_CACHE_DIR", str(cache))
    root = ensure_synthetic_dataset(per_class=6, image_size=32)
    assert root.parent == cache and root.name.startswith("synthetic-v1-")
    files = sorted(root.rglob("*.png"))
    assert len(files) == len(SYNTHETIC_DOMAINS) * 5 * 6 == 6 * 5 * 6
    assert sorted(p.name for p in cache.iterdir()) == [root.name]  # no temporary leftovers
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert ensure_synthetic_dataset(per_class=6, image_size=32) == root
    assert {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*.png"))} == mtimes

    ds = scan_domains(root)
    assert list(ds.samples) == sorted(SYNTHETIC_DOMAINS) and ds.classes == sorted(SYNTHETIC_CLASSES)
    assert ds.skipped == [] and all(len(v) == 5 * 6 for v in ds.samples.values())
    img = Image.open(root / "photo" / "star" / "000.png")
    assert img.mode == "RGB" and img.size == (32, 32)
    # Different parameters give a different folder; styles differ between domains.
    other = ensure_synthetic_dataset(per_class=5, image_size=32)
    assert other != root
    means = {d: np.asarray(Image.open(root / d / "circle" / "000.png"), dtype=float).mean() for d in SYNTHETIC_DOMAINS}
    assert means["sketch"] > means["photo"] and means["sketch"] > means["painting"]
    assert means["chalk"] < means["photo"] and means["neon"] < means["chalk"]  # a dark board, a dark wall
    # Deterministic: regenerating elsewhere gives identical pixels.
    again = ensure_synthetic_dataset(tmp_path / "elsewhere", per_class=6, image_size=32)
    for p in files[:10]:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(again / p.relative_to(root))))


def test_synthetic_draws_only_the_styles_a_run_uses(tmp_path: Path) -> None:
    root = ensure_synthetic_dataset(tmp_path, per_class=2, image_size=16, domains=["sketch", "photo"])
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["photo", "sketch"]
    sketch = {p: p.stat().st_mtime_ns for p in (root / "sketch").rglob("*.png")}
    # Another run that needs more styles adds them to the same folder and leaves the drawn ones alone.
    assert ensure_synthetic_dataset(tmp_path, per_class=2, image_size=16, domains=["sketch", "neon"]) == root
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["neon", "photo", "sketch"]
    assert {p: p.stat().st_mtime_ns for p in (root / "sketch").rglob("*.png")} == sketch
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    with pytest.raises(DataError, match=r"no style \['video'\].*Fix: choose among"):
        ensure_synthetic_dataset(tmp_path, per_class=2, image_size=16, domains=["sketch", "video"])


def test_synthetic_concurrent_callers(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(ensure_synthetic_dataset(tmp_path, per_class=2, image_size=16))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    root = results[0]
    assert len(list(root.rglob("*.png"))) == len(SYNTHETIC_DOMAINS) * 5 * 2
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_synthetic_bad_params(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        ensure_synthetic_dataset(tmp_path, per_class=0, image_size=8)
    assert "data.synthetic_per_class" in str(err.value) and "data.synthetic_image_size" in str(err.value)


def test_cached_batches_follow_the_loaders_order():
    """Training on cached features gathers batches by the loader's own sampler, not through the
    DataLoader: the same batches in the same order, epoch after epoch, as iterating the loader."""
    from fedclip_lightning.data.pipeline import FeatureDataset, make_loader
    from fedclip_lightning.training import batches

    ds = FeatureDataset(torch.arange(70.0).reshape(70, 1), torch.arange(70))

    def make():
        return make_loader(ds, 32, num_workers=0, shuffle_seed=(0, "train", 1, "client0"))

    through, direct = make(), make()
    epochs_a = [[y.tolist() for _, y in through] for _ in range(2)]
    epochs_b = [[y.tolist() for _, y in batches(direct)] for _ in range(2)]
    assert epochs_a == epochs_b
    assert epochs_a[0] != epochs_a[1] and sorted(sum(epochs_a[0], [])) == list(range(70))
    assert [len(b) for b in epochs_a[0]] == [32, 32, 6]
    other = [y.tolist() for _, y in make_loader(ds, 32, num_workers=0, shuffle_seed=(0, "train", 2, "client0"))]
    assert other != epochs_a[0]  # another round, another order
    ordered = make_loader(ds, 32, num_workers=0, shuffle_seed=None)
    assert [y.tolist() for _, y in batches(ordered)] == [list(range(0, 32)), list(range(32, 64)), list(range(64, 70))]
