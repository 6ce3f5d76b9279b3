"""--lesion-paste: another patient's lesion carved and pasted into a slice's brain (CarveMix in 2D)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import lesion_volume
from data_loaders import LGGSlices, channel_sources, make_volume
from data_preprocessing import VolumeStats, eval_preprocess, paste_lesion
from engine import main


def _stats(mean, std, low=(0, 0, 0), high=(255, 255, 255)) -> VolumeStats:
    arr = lambda v: np.array(v, np.float32)  # noqa: E731
    return VolumeStats(low=arr(low), high=arr(high), mean=arr(mean), std=arr(std))


def _square(size: int, y: int, x: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[y:y + side, x:x + side] = 1
    return m


def test_the_lesion_keeps_its_normalized_value_in_each_channel():
    """Donor pixels are z-scored with the donor's statistics (after its clip) and put back with the
    target's: lesion 90 in a donor of mean 50 and std 10 is z = 4 in channels 0 and 1 -> 100 + 4 * std;
    channel 2 clips the donor at 70 first, z = 2; the tissue around it (50, z = 0) becomes 100."""
    image = np.full((16, 16, 3), 100, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    lesion = _square(16, 6, 6, 3)
    donor = np.where(lesion[..., None] > 0, 90, 50).astype(np.uint8).repeat(3, axis=2)
    out, new_mask = paste_lesion(image, mask, _stats((100, 100, 100), (20, 10, 5)), donor, lesion,
                                 _stats((50, 50, 50), (10, 10, 10), high=(255, 255, 70)),
                                 allowed=np.ones((16, 16), bool), margin=2, feather=0)
    assert out[lesion > 0].tolist() == [[180, 140, 110]] * 9
    assert (out[lesion == 0] == 100).all()  # the carved tissue lands on the target's mean, as do all others
    assert np.array_equal(new_mask, lesion)
    blended, _ = paste_lesion(image, mask, _stats((100, 100, 100), (20, 10, 5)), donor, lesion,
                              _stats((50, 50, 50), (10, 10, 10), high=(255, 255, 70)),
                              allowed=np.ones((16, 16), bool), margin=2)
    assert blended[lesion > 0].tolist() == [[180, 140, 110]] * 9  # feathering blends the carved edge only


def test_the_region_must_lie_inside_the_brain_and_the_rest_is_untouched():
    image = np.random.default_rng(0).integers(1, 255, (16, 16, 3), dtype=np.uint8)
    mask = _square(16, 0, 0, 2) + _square(16, 4, 5, 1)  # own tumor far away, and one pixel just above the lesion
    lesion = _square(16, 5, 5, 2)
    donor = np.full((16, 16, 3), 60, np.uint8)
    stats = _stats((100, 100, 100), (20, 20, 20))
    # A margin of 1 px is a cross-shaped dilation: the 2 x 2 lesion and one pixel beside each of its edges.
    region = np.zeros((16, 16), bool)
    region[4:8, 5:7] = region[5:7, 4:8] = True
    brain = np.zeros((16, 16), bool)
    brain[4:8, 4:8] = True
    out, new_mask = paste_lesion(image, mask, stats, donor, lesion, stats, allowed=brain, margin=1, feather=0)
    assert np.array_equal(out[~region], image[~region])
    assert (out[region] == 60).all()
    # The lesion is tumor; the pasted tissue over the own tumor pixel (4, 5) is not; the far tumor stays.
    assert np.array_equal(new_mask, lesion + _square(16, 0, 0, 2))
    brain[4, 5] = False  # one pixel of the region outside the brain: no paste
    assert paste_lesion(image, mask, stats, donor, lesion, stats, allowed=brain, margin=1) is None


def test_a_channel_that_copies_flair_takes_the_donors_flair():
    """A patient without pre-contrast carries FLAIR there; pasting keeps channel 0 equal to channel 1."""
    rng = np.random.default_rng(1)
    flair = rng.integers(20, 200, (2, 16, 16), dtype=np.uint8)
    target = np.stack([flair[0], flair[0], rng.integers(20, 200, (16, 16), dtype=np.uint8)], axis=-1)
    vol = make_volume("T", target[None], np.zeros((1, 16, 16), np.uint8), [1])
    sources = channel_sources(vol.images)
    assert sources == (1, 1, 2)
    donor_vol = make_volume("D", rng.integers(20, 200, (1, 16, 16, 3), dtype=np.uint8), _square(16, 5, 5, 4)[None], [1])
    assert channel_sources(donor_vol.images) == (0, 1, 2)
    out, _ = paste_lesion(target, vol.masks[0], vol.stats, donor_vol.images[0], donor_vol.masks[0], donor_vol.stats,
                          allowed=np.ones((16, 16), bool), margin=1, sources=sources)
    assert np.array_equal(out[..., 0], out[..., 1])
    assert not np.array_equal(out[..., 1], target[..., 1])


def _lesion_places(vol, mirrored: bool) -> set[tuple[int, int]]:
    """Where the volume's lesion lies, as it is or mirrored left-right."""
    ys, xs = np.nonzero(vol.masks.any(axis=0))
    return {(int(a), 47 - int(b) if mirrored else int(b)) for a, b in zip(ys, xs)}


def test_the_dataset_pastes_other_patients_lesions_near_the_tumor_only_and_reproducibly():
    vols = [lesion_volume("A", 20, 14, (0, 1)), lesion_volume("B", 22, 26, (0, 1, 2)),
            lesion_volume("C", 16, 20, (0,), copies=True)]
    plain = LGGSlices(vols, eval_preprocess(48))
    pasted = LGGSlices(vols, eval_preprocess(48), lesion_paste=1.0)
    pasted.reseed(7)
    first = [pasted[i] for i in range(len(pasted))]
    pasted.reseed(7)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, (pasted[i] for i in range(len(pasted)))))
    # C carries FLAIR three times: no donor. A pasted lesion comes as it is or mirrored, both seen.
    donors = {(name, m): _lesion_places(v, m) for name, v in zip("AB", vols) for m in (False, True)}
    took, ways = 0, set()
    for item, before in zip(first, (plain[i] for i in range(len(plain)))):
        name, j = plain.patients[item["patient"]], item["slice"] - 1
        new = np.argwhere((item["mask"][0] > 0).numpy() & (before["mask"][0] == 0).numpy())
        if not len(new):
            assert np.array_equal(item["image"], before["image"])
            continue
        took += 1
        assert j <= max(np.flatnonzero(vols[plain.patients.index(name)].masks.any(axis=(1, 2)))) + 2
        places = {(int(a), int(b)) for a, b in new}
        match = [(other, m) for (other, m), lesion in donors.items() if other != name and places <= lesion]
        assert match
        ways.add(match[0][1])
    assert took >= 6 and ways == {False, True}  # slices 0-3 of A, 0-4 of B and 0-2 of C may take one; each fits
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(plain, LGGSlices(vols, eval_preprocess(48))))


def test_lesion_paste_reaches_the_training_slices_only(tmp_path, monkeypatch):
    """At p = 1 every training item tries a paste, and no validation item does."""
    tried = []
    real = LGGSlices._paste
    monkeypatch.setattr(LGGSlices, "_paste",
                        lambda self, p, j, *a: tried.append(self.patients[p]) or real(self, p, j, *a))
    args = ["--synthetic", "--synthetic-dir", str(tmp_path / "syn"), "--synthetic-patients", "5",
            "--synthetic-slices", "6", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--lesion-paste", "1", "--val-fraction", "0.4", "--progress", "off", "--cache-dir", "off",
            "--out-dir", str(tmp_path / "run")]
    assert main(args) == 0
    patients = json.loads((tmp_path / "run" / "config.json").read_text())["patients"]
    assert len(tried) == 6 * len(patients["train"]) and set(tried) <= set(patients["train"])


@pytest.mark.parametrize("flag", ["--lesion-paste", "--lesion-fade"])  # both work on whole 2D slices
@pytest.mark.parametrize("extra, says", [
    (["1.5"], "probability in [0, 1]"),
    (["0.5", "--context-slices", "1"], "--context-slices"),
    (["0.5", "--normalization", "buda"], "--normalization buda"),
])
def test_bad_lesion_paste_or_fade_is_refused_in_one_line(tmp_path, capsys, flag, extra, says):
    out = tmp_path / "run"
    assert main(["--synthetic", "--synthetic-dir", str(tmp_path / "syn"), "--out-dir", str(out), flag, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and flag in err and says in err
    assert not out.exists()
