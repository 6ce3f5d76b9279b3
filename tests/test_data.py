"""Finding, pairing, ordering, reading and splitting the Kaggle layout, on fake trees in tmp_path."""

import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import write_slice

from conftest import read_mask
from data_cache import load_volume
from data_files import (
    DATA_ENV_VAR,
    FLAIR_CHANNEL,
    DataIssues,
    DatasetError,
    find_data_dir,
    group_by_patient,
    read_image,
    scan_dataset,
)
from data_loaders import LGGSlices, make_loader, match_patients, read_patient_list, split_patients
from synthetic_data import make_synthetic_dataset
from data_preprocessing import eval_preprocess, normalize, train_preprocess


def test_pairs_each_slice_with_its_mask_in_numeric_order(fake_tree):
    records = scan_dataset(fake_tree)
    groups = group_by_patient(records)
    assert len(groups) == 5 and len(records) == 15  # stray files ignored
    for patient, recs in groups.items():
        assert [r.index for r in recs] == [8, 9, 10]  # 9 before 10: numeric, not lexical
        for r in recs:
            assert r.image_path.name == f"{patient}_{r.index}.tif"
            assert r.mask_path.name == f"{patient}_{r.index}_mask.tif"
            assert r.image_path.parent.name == patient


def test_image_without_mask_is_named(fake_tree):
    victim = next(fake_tree.glob("*/*_9_mask.tif"))
    victim.unlink()
    with pytest.raises(DatasetError, match=victim.name.replace("_mask", "")):
        scan_dataset(fake_tree)


def test_mask_without_image_is_named(fake_tree):
    victim = next(fake_tree.glob("*/*_10.tif"))
    victim.unlink()
    with pytest.raises(DatasetError, match="mask has no image"):
        scan_dataset(fake_tree)


def test_split_is_by_patient_disjoint_and_seeded():
    patients = [f"P{i:02d}" for i in range(20)]
    train, val = split_patients(patients, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(patients)
    assert split_patients(list(reversed(patients)), 0.2, seed=1) == (train, val)  # order-free
    assert any(split_patients(patients, 0.2, seed=s)[1] != val for s in range(2, 6))


def test_split_keeps_every_slice_of_a_patient_together(fake_tree):
    records = scan_dataset(fake_tree)
    train, val = split_patients(sorted(group_by_patient(records)), 0.4, seed=0)
    train_files = {r.image_path for r in records if r.patient in train}
    val_files = {r.image_path for r in records if r.patient in val}
    assert train_files and val_files and train_files.isdisjoint(val_files)
    assert len(train_files) + len(val_files) == len(records)


def test_split_needs_two_patients():
    with pytest.raises(DatasetError):
        split_patients(["only"], 0.2, seed=0)


def test_read_image_keeps_file_channel_order(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 200, 50  # pre-contrast, FLAIR, post-contrast
    write_slice(tmp_path, "P", 1, rgb, np.array([[0, 255, 0, 0]] * 4, np.uint8))
    image = read_image(tmp_path / "P_1.tif")
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8
    assert (image[..., 0] == 10).all() and (image[..., 1] == 200).all() and (image[..., 2] == 50).all()
    mask = read_mask(tmp_path / "P_1_mask.tif")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask[:, 1].all() and mask.sum() == 4


def test_unreadable_tiff_is_named(tmp_path):
    bad = tmp_path / "P_1.tif"
    bad.write_bytes(b"")
    with pytest.raises(DatasetError, match="P_1.tif"):
        read_image(bad)


def test_find_data_dir_order(fake_tree, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_data_dir(None) == Path("kaggle_3m")  # default location, relative to cwd
    assert find_data_dir(str(fake_tree)) == fake_tree
    assert find_data_dir(str(tmp_path)) == fake_tree  # the folder the archive was unpacked into
    monkeypatch.setenv(DATA_ENV_VAR, str(fake_tree))
    assert find_data_dir(None) == fake_tree
    with pytest.raises(DatasetError, match="no such folder"):
        find_data_dir(str(tmp_path / "nowhere"))


def test_nothing_found_returns_none(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_data_dir(None) is None


def test_dataset_items(fake_tree):
    groups = group_by_patient(scan_dataset(fake_tree))
    volumes = [load_volume(groups[name]) for name in sorted(groups)[:2]]
    ds = LGGSlices(volumes, eval_preprocess(32), full_mask=True)
    assert len(ds) == 6
    item = ds[4]
    assert item["patient"] == 1 and item["slice"] == 9
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["full_mask"].shape == (1, 16, 16) and item["full_mask"].sum() == 16


def test_synthetic_dataset_is_deterministic_and_lgg_like(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", patients=3, slices=9, size=64, seed=5)
    b = make_synthetic_dataset(tmp_path / "b", patients=3, slices=9, size=64, seed=5)
    records = scan_dataset(a)
    assert len(group_by_patient(records)) == 3 and len(records) == 27
    for r in records:
        twin = b / r.image_path.relative_to(a)
        assert twin.read_bytes() == r.image_path.read_bytes()
    tumor = [read_mask(r.mask_path).any() for r in records]
    assert 0.2 <= np.mean(tumor) <= 0.5  # lesion in roughly a third of the slices
    # The lesion is brighter than the rest of the head on FLAIR (channel 1).
    r = next(r for r, t in zip(records, tumor) if t)
    image, mask = read_image(r.image_path), read_mask(r.mask_path).astype(bool)
    head = (image[..., 1] > 0) & ~mask
    assert image[..., 1][mask].mean() > 1.2 * image[..., 1][head].mean()
    # Reused when it exists with the same parameters.
    stamp = (a / "synthetic.json").stat().st_mtime_ns
    make_synthetic_dataset(a, patients=3, slices=9, size=64, seed=5)
    assert (a / "synthetic.json").stat().st_mtime_ns == stamp


def test_synthetic_patients_copied_elsewhere_are_still_synthetic(tmp_path, capsys):
    """Only the generator's manifest marked a tree synthetic: its patients copied into a folder of
    their own trained and scored as "real data", and so did a real model evaluated on them."""
    import shutil

    from data_loaders import locate_data
    from engine import main
    from synthetic_data import is_synthetic

    root = make_synthetic_dataset(tmp_path / "syn", patients=3, slices=4, size=32, seed=1)
    mine = tmp_path / "mine"
    for name in ("SYN_00_20000101", "SYN_01_20000102"):
        shutil.copytree(root / name, mine / name)
    assert is_synthetic(root) and is_synthetic(mine) and locate_data(str(mine), seed=0) == (mine, True)
    real = tmp_path / "real"
    mask = np.zeros((32, 32), np.uint8)
    mask[10:20, 10:20] = 255
    write_slice(real / "TCGA_CS_4941_19960909", "TCGA_CS_4941_19960909", 1,
                np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8), mask)
    (real / "SYN_notes").mkdir()  # not a generated patient's name
    assert not is_synthetic(real)

    run = tmp_path / "run"
    assert main(["--data-dir", str(mine), "--epochs", "1", "--image-size", "32", "--features", "4",
                 "--batch-size", "4", "--out-dir", str(run), "--device", "cpu"]) == 0
    assert "(SYNTHETIC data: not a result on MRI)" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data-dir", str(root), "--patients",
                 "SYN_02_20000103", "--out-dir", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    assert "SYNTHETIC data: not a result on MRI" in capsys.readouterr().out
    # The label is the scored patients': real ones are real data, whatever the model learned on.
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data-dir", str(real), "--patients", "all",
                 "--out-dir", str(tmp_path / "ev-real"), "--device", "cpu"]) == 0
    assert "(epoch 1, real data; patients: all)" in capsys.readouterr().out


def _batches(dataset, workers, seed):
    loader = make_loader(dataset, batch_size=4, train=True, seed=seed, num_workers=workers)
    return [(b["image"].clone(), b["mask"].clone(), b["slice"].clone()) for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_is_reproducible_and_augments(fake_tree, workers):
    groups = group_by_patient(scan_dataset(fake_tree))
    volumes = [load_volume(groups[name]) for name in sorted(groups)]
    ds = LGGSlices(volumes, train_preprocess(16, affine_p=1.0, intensity_p=1.0))
    a, b = _batches(ds, workers, seed=3), _batches(ds, workers, seed=3)
    assert len(a) == 4  # 15 slices, batch 4: the last batch of 3 is kept
    for (xa, ya, sa), (xb, yb, sb) in zip(a, b):
        assert torch.equal(sa, sb) and torch.equal(xa, xb) and torch.equal(ya, yb)
    c = _batches(ds, workers, seed=4)
    assert any(not torch.equal(xa, xc) for (xa, _, _), (xc, _, _) in zip(a, c))


@pytest.mark.parametrize("train", [False, True], ids=["in-order", "training"])
def test_each_worker_has_its_own_augmentation_stream(fake_tree, train):
    # Six copies of one slice, one per batch: worker 0 gets batches 0, 2, 4 and worker 1 gets
    # 1, 3, 5. Had both workers the same augmentation seed, batches 0 and 1 would be equal.
    # A training loader reseeds its workers from the epoch's stream (EpochStream); others once.
    vol = load_volume(group_by_patient(scan_dataset(fake_tree))["TCGA_XX_0000_20000101"][:1])
    vol.images, vol.masks = vol.images.repeat(6, 0), vol.masks.repeat(6, 0)
    vol.slice_numbers = list(range(6))
    ds = LGGSlices([vol], train_preprocess(16, affine_p=1.0, intensity_p=1.0))
    images = [b["image"] for b in make_loader(ds, batch_size=1, train=train, seed=0, num_workers=2)]
    assert len(images) == 6
    assert not torch.equal(images[0], images[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the start method on Linux alone")
def test_workers_fork_on_linux_whatever_pythons_default(fake_tree, tmp_path):
    """Python 3.14 made forkserver Linux's default: each worker then unpickled its own copy of every
    volume on every epoch. A forked worker's parent is the training process; a forkserver's is not."""
    script = tmp_path / "start.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from data_cache import load_volume
        from data_files import group_by_patient, scan_dataset
        from data_loaders import LGGSlices, make_loader
        from data_preprocessing import eval_preprocess

        class Parents(LGGSlices):
            def __getitem__(self, i):
                return {{"parent": os.getppid()}}

        if __name__ == "__main__":
            multiprocessing.set_start_method("forkserver")
            volumes = [load_volume(g) for g in group_by_patient(scan_dataset(Path({str(fake_tree)!r}))).values()]
            loader = make_loader(Parents(volumes, eval_preprocess(16)), batch_size=4, train=True, seed=0,
                                 num_workers=2)
            print(sorted({{int(p) for b in loader for p in b["parent"]}}) == [os.getpid()])
        """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


def test_spawned_workers_share_the_volumes_and_last_from_epoch_to_epoch(fake_tree, tmp_path):
    """On macOS and Windows workers are spawned: each unpickled its own copy of every volume, and
    imported torch, on every epoch. Now the volumes lie in shared memory, so a worker's write reaches
    the training process's arrays, and the same workers serve every epoch. The items are those the
    training process makes itself."""
    script = tmp_path / "spawn.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import torch
        import data_loaders
        from data_cache import load_volume
        from data_files import group_by_patient, scan_dataset
        from data_loaders import LGGSlices, make_loader
        from data_preprocessing import eval_preprocess

        class Marking(LGGSlices):  # marks each slice it reads, in the worker's view of the volume
            def __getitem__(self, i):
                item = super().__getitem__(i)
                p, j = self.index[i]
                self.volumes[p].images[j, 0, 0, 0] = 201
                self.volumes[p].masks[j, 0, 0] = 7
                return {{**item, "pid": os.getpid()}}

        def items(loader):
            return [(b["image"], b["mask"], b["slice"]) for b in loader]

        if __name__ == "__main__":
            data_loaders.worker_start_method = lambda: "spawn"  # as on macOS and Windows
            volumes = [load_volume(g) for g in group_by_patient(scan_dataset(Path({str(fake_tree)!r}))).values()]
            expected = items(make_loader(LGGSlices(volumes, eval_preprocess(16)), batch_size=4, train=False,
                                         seed=0, num_workers=0))
            loader = make_loader(Marking(volumes, eval_preprocess(16)), batch_size=4, train=False, seed=0,
                                 num_workers=2)
            got = items(loader)
            same = len(got) == len(expected) and all(
                all(torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(got, expected))
            marked = all((v.images[:, 0, 0, 0] == 201).all() and (v.masks[:, 0, 0] == 7).all() for v in volumes)
            workers = [{{int(p) for b in loader for p in b["pid"]}} for _ in range(2)]
            print(same, marked, len(workers[0]) == 2 and workers[0] == workers[1])
        """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True True True", result.stderr


def test_no_workers_by_default_for_a_cpu_model_where_workers_are_spawned(monkeypatch):
    """On macOS and Windows workers are spawned, each starting seconds late every epoch, for an input
    pipeline that takes a few percent of a CPU training step at most; a GPU still gets them."""
    import data_loaders

    monkeypatch.setattr(data_loaders.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert data_loaders.default_num_workers(torch.device("cpu")) == (4 if sys.platform.startswith("linux") else 0)
    monkeypatch.setattr(data_loaders.sys, "platform", "darwin")
    monkeypatch.setattr(data_loaders.multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    assert data_loaders.worker_start_method() == "spawn"
    assert data_loaders.default_num_workers(torch.device("cpu")) == 0
    assert data_loaders.default_num_workers(torch.device("cuda")) == 4
    monkeypatch.setattr(data_loaders.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert data_loaders.default_num_workers(torch.device("cuda")) == 0  # 2 cores: the model's


def _fake_volume(fake_tree):
    # 3 slices of independent random channels: two channels are equal only if one was copied.
    return load_volume(group_by_patient(scan_dataset(fake_tree))["TCGA_XX_0000_20000101"])


def test_modality_dropout_fills_channels_with_flair_and_its_statistics(fake_tree):
    vol = _fake_volume(fake_tree)
    images_before, stats_before = vol.images.copy(), vol.stats.as_tensor()
    plain = LGGSlices([vol], eval_preprocess(16))
    dropped = LGGSlices([vol], eval_preprocess(16), modality_dropout=1.0)
    for i in range(len(plain)):
        a, b = plain[i], dropped[i]
        assert torch.equal(a["stats"], stats_before) and torch.equal(a["image"], torch.from_numpy(
            vol.images[i].transpose(2, 0, 1).copy()))
        assert not torch.equal(a["image"][0], a["image"][1])  # the fixture's channels differ
        for c in range(3):
            assert torch.equal(b["image"][c], a["image"][FLAIR_CHANNEL])
            assert torch.equal(b["stats"][:, c], stats_before[:, FLAIR_CHANNEL])
        # Exactly what a patient whose file holds FLAIR three times looks like to the model.
        x = normalize(b["image"], b["stats"])
        assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[1])
        assert torch.equal(b["mask"], a["mask"])
    assert np.array_equal(vol.images, images_before) and torch.equal(vol.stats.as_tensor(), stats_before)


def test_modality_dropout_rate_is_per_channel_and_seeded(fake_tree):
    ds = LGGSlices([_fake_volume(fake_tree)], eval_preprocess(16), modality_dropout=0.3)

    def draws(seed, n=600):
        ds.reseed(seed)
        out = []
        for k in range(n):
            image = ds[k % len(ds)]["image"]
            out.append([torch.equal(image[c], image[FLAIR_CHANNEL]) for c in (0, 2)])
        return np.array(out)

    a = draws(5)
    assert np.array_equal(a, draws(5)) and not np.array_equal(a, draws(6))
    # Each channel independently with chance 0.3: 180 of 600 expected, sd 11.2; 4 sd either side.
    for count in a.sum(axis=0):
        assert abs(count - 180) < 45, count
    both = (a[:, 0] & a[:, 1]).sum()  # 0.09 * 600 = 54 expected, sd 7.0
    assert abs(both - 54) < 28, both


def test_cache_is_reused_and_rebuilt_when_a_file_changes(fake_tree, tmp_path, monkeypatch):
    import data_cache

    decoded = []
    real_read = data_cache.read_image
    monkeypatch.setattr(data_cache, "read_image", lambda p, *rest: decoded.append(p) or real_read(p, *rest))
    cache = tmp_path / "cache"
    recs = group_by_patient(scan_dataset(fake_tree))["TCGA_XX_0001_20000101"]

    first = load_volume(recs, cache)
    assert len(decoded) == 3 and len(list(cache.rglob("*.npz"))) == 1
    second = load_volume(recs, cache)
    assert len(decoded) == 3  # no TIFF decoded again
    plain = load_volume(recs)  # no cache: decodes the 3 slices
    assert len(decoded) == 6
    for v in (first, second):
        assert np.array_equal(v.images, plain.images) and np.array_equal(v.masks, plain.masks)
        assert v.slice_numbers == plain.slice_numbers == [8, 9, 10]
        assert np.array_equal(v.stats.mean, plain.stats.mean) and np.array_equal(v.stats.std, plain.stats.std)

    # Rewrite slice 9 with new pixels: that patient is decoded again and the old entry goes.
    new_rgb = np.full((16, 16, 3), 99, np.uint8)
    new_mask = np.zeros((16, 16), np.uint8)
    write_slice(fake_tree / recs[1].patient, recs[1].patient, 9, new_rgb, new_mask)
    recs = group_by_patient(scan_dataset(fake_tree))["TCGA_XX_0001_20000101"]
    third = load_volume(recs, cache)
    assert len(decoded) == 9
    assert (third.images[1] == 99).all() and third.masks[1].sum() == 0
    assert len(list(cache.rglob("*.npz"))) == 1

    # A damaged entry is rebuilt, not trusted.
    (entry,) = cache.rglob("*.npz")
    entry.write_bytes(b"garbage")
    fourth = load_volume(recs, cache)
    assert len(decoded) == 12 and np.array_equal(fourth.images, third.images)


# ------------------------------------------------------------------ integrity checks on the file names


def _pair(folder, patient, index, suffix=".tif"):
    rgb = np.full((16, 16, 3), 50, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{patient}_{index}{suffix}"), rgb)
    cv2.imwrite(str(folder / f"{patient}_{index}_mask{suffix}"), mask)


def test_name_checks_report_duplicates_gaps_strays_and_nesting(tmp_path):
    root = tmp_path / "kaggle_3m"
    p = "TCGA_AA_0001_2000"
    for i in (1, 2, 3, 5):  # 4 is missing: a gap
        _pair(root / p, p, i)
    _pair(root / p, p, "01")  # '_01' beside '_1': slice 1 twice
    _pair(root / p, p, 2, ".tiff")  # '.tiff' beside '.tif': slice 2 twice
    _pair(root / p, "TCGA_BB_0002_2000", 6)  # a slice of another patient in this folder
    q = "TCGA é 0003_2000"  # spaces and non-ASCII characters in names are read like any other
    for i in (1, 2):
        _pair(root / q, q, i)
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are no patient's: not reported either
    issues = DataIssues()
    records = scan_dataset(root, issues)
    assert {(r.patient, r.index) for r in records} == {(p, 3), (p, 5), (q, 1), (q, 2)}
    kinds = issues.summary()
    assert "patient folder without slices" not in kinds
    assert "4 skipped: duplicate slice number" in kinds  # slices 1 and 2, image and mask of each
    assert "2 skipped: slice of another patient" in kinds and "1 warning: gap in slice numbers" in kinds
    messages = "\n".join(m for _, m in issues.items)
    assert f"{p}_1.tif, {p}_01.tif are all slice 1" in messages.replace(f"{p}_01.tif, {p}_1.tif", f"{p}_1.tif, {p}_01.tif")
    assert "no slice [4] between 1 and 5" in messages and "move it to its own patient's folder" in messages
    assert load_volume(group_by_patient(records)[q]).masks.sum() == 2 * 16
    with pytest.raises(DatasetError, match="--strict makes this an error"):
        scan_dataset(root, DataIssues(strict=True))
    # The archive unpacked twice: the patient folders one level too deep are found and named.
    nested = tmp_path / "download"
    (nested / "kaggle_3m").mkdir(parents=True)
    root.rename(nested / "kaggle_3m" / "kaggle_3m")
    with pytest.raises(DatasetError, match=r"nested deeper, in .*kaggle_3m/kaggle_3m"):
        find_data_dir(nested)
    # One patient's folder instead of the dataset's: the folder that holds it is named.
    patient = nested / "kaggle_3m" / "kaggle_3m" / p
    with pytest.raises(DatasetError, match=rf"{p}: one patient's folder; .* \({patient.parent.resolve()}\)"):
        find_data_dir(patient)
    # Slices without any mask (data to predict on) were "no patient folders ... found"; and a file
    # given as the folder was "no such folder".
    for mask in patient.parent.rglob("*_mask.tif*"):
        mask.unlink()
    with pytest.raises(DatasetError, match=r"slices without any \*_mask.tif; .* predict --checkpoint <best.pt> "
                                           rf"--input {patient.parent}"):
        find_data_dir(patient.parent)
    with pytest.raises(DatasetError, match=r"a file, not the dataset's folder"):
        find_data_dir(next(patient.glob("*.tif")))
    # Kaggle's download, not yet unzipped: how to unzip it (it was "a file, not the dataset's folder").
    import zipfile
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as z:
        z.writestr("kaggle_3m/README.md", "")
    with pytest.raises(DatasetError, match=rf"archive.zip \(from --data-dir\): a zip archive \(Kaggle's archive.zip\?\); "
                                           rf"unzip it \('unzip {tmp_path}/archive.zip -d {tmp_path}/archive'\) and "
                                           "pass the kaggle_3m folder inside it"):
        find_data_dir(tmp_path / "archive.zip")


def test_a_mask_with_differing_channels_is_reported(tmp_path):
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[2:4, 2:4, 0] = 255
    mask[5:7, 5:7, 1] = 255  # another label in the second channel
    cv2.imwrite(str(tmp_path / "P_1_mask.tif"), mask)
    issues = DataIssues()
    assert read_mask(tmp_path / "P_1_mask.tif", issues).sum() == 4  # OpenCV's BGR: file channel 0 is last
    assert issues.summary() == "1 fixed: mask with several channels"


def test_no_dataset_found_names_every_place_looked_and_how_to_get_it(tmp_path, monkeypatch, capsys):
    """The message named ./kaggle_3m but not ./lgg-mri-segmentation/kaggle_3m, where download puts it."""
    import data_loaders

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LGG_DATA_DIR", raising=False)
    monkeypatch.setattr(data_loaders, "make_synthetic_dataset", lambda path, seed: path)
    assert data_loaders.locate_data("", seed=0) == (Path(data_loaders.SYNTHETIC_DIR), True)
    out = capsys.readouterr().out
    assert "No LGG dataset found (--data-dir, $LGG_DATA_DIR, ./kaggle_3m, ./lgg-mri-segmentation/kaggle_3m)" in out
    assert "python engine.py download (then found by itself)" in out


def test_a_patient_list_file_as_editors_save_it(tmp_path):
    # Windows Notepad writes a byte-order mark and CRLF; people add comments and blank lines. A
    # binary file given by mistake was a UnicodeDecodeError traceback.
    names = ["TCGA_AA_0001_2000", "TCGA_BB_0002_2000"]
    files = {"bom.txt": b"\xef\xbb\xbfTCGA_AA_0001_2000\r\nTCGA_BB_0002_2000\r\n\r\n",
             "notes.txt": b"# validation\nTCGA_AA_0001_2000  # first\n\n  TCGA_BB_0002_2000\n",
             "comma.csv": b"TCGA_AA_0001_2000,TCGA_BB_0002_2000",
             # Windows PowerShell 5's 'echo TCGA_AA_0001_2000 TCGA_BB_0002_2000 > list.txt': UTF-16 with
             # a byte-order mark, which was refused as "not a text file".
             "powershell.txt": "\ufeffTCGA_AA_0001_2000\r\nTCGA_BB_0002_2000\r\n".encode("utf-16-le"),
             "big-endian.txt": "\ufeffTCGA_AA_0001_2000\nTCGA_BB_0002_2000\n".encode("utf-16-be"),
             # A table of this package's (cv_patients.csv, per_patient.csv): its patient column, which
             # before was read as names along with every header word and number.
             "cv_patients.csv": b"fold,patient,dice\n0,TCGA_AA_0001_2000,0.5\n1,TCGA_BB_0002_2000,0.7\n",
             "per_patient.csv": b'\xef\xbb\xbfpatient,site,note\r\nTCGA_AA_0001_2000,AA,"a, b"\r\n'
                                b"TCGA_BB_0002_2000,BB,\r\n"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        assert read_patient_list(str(tmp_path / name)) == (names, str(tmp_path / name)), name
    # Names that match no folder are listed up to five, then counted.
    with pytest.raises(DatasetError, match=r"^--val-patients: no patient folder for A, B, C, D, E, \.\.\. "
                                           r"\(7 in all\); "):
        match_patients(list("ABCDEFG"), names, "--val-patients")
    (tmp_path / "slice.tif").write_bytes(bytes([0x49, 0x49, 0x2A, 0x00, 0x94, 0xFF]))
    with pytest.raises(DatasetError, match=r"slice.tif: not a text file; pass a file of patient names"):
        read_patient_list(str(tmp_path / "slice.tif"))
