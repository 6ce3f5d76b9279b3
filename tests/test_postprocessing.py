"""Post-processing that cannot throw the tumor away for a scalp artefact, overlays that show
false positives, and what a checkpoint must be."""

from __future__ import annotations

import numpy as np
import pytest

import reports
from data_preprocessing import background_level, brain_interior, fill_slice_holes
from engine import main
from evaluation import PatientPrediction, score_volumes
from metrics import brain_components_3d, largest_component_3d


def head_volume(depth: int = 6, size: int = 64) -> np.ndarray:
    """(D, size, size, 3) uint8: a bright disc of radius 28 (the head) on a black background."""
    yy, xx = np.mgrid[:size, :size]
    head = (yy - 32) ** 2 + (xx - 32) ** 2 <= 28**2
    return np.repeat(np.where(head, 120, 0).astype(np.uint8)[None, ..., None], depth, 0).repeat(3, -1)


def tumor_and_rim() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small true lesion near the centre (3 slices of 4x4 = 48 voxels) and a larger false
    component on the rim of the head (6 slices of an arc of 50 px, 300 voxels); truth = the lesion."""
    pred = np.zeros((6, 64, 64), bool)
    pred[2:5, 30:34, 30:34] = True  # the tumor
    yy, xx = np.mgrid[:64, :64]
    r = np.sqrt((yy - 32) ** 2 + (xx - 32) ** 2)
    arc = (r >= 26) & (r <= 27.5) & (yy < 10)  # scalp, top of the image: 50 px
    pred[:, arc] = True
    truth = np.zeros_like(pred)
    truth[2:5, 30:34, 30:34] = True
    return pred, truth, arc


def test_brain_interior_is_the_head_without_its_rim():
    inside = brain_interior(head_volume())
    assert inside.shape == (6, 64, 64)
    assert inside[:, 32, 32].all()  # the centre
    assert not inside[:, 32, 1].any()  # outside the head
    # Eroded by round(0.05 * 64) = 3 px: radius 28 -> 25 along the axes.
    assert inside[0, 32, 32 + 25] and not inside[0, 32, 32 + 26]


def test_brain_interior_ignores_a_constant_background_offset_in_one_channel():
    # Some FG scans store air at 76 or 103 in the pre-contrast channel: air brighter than a tenth
    # of the brightest tissue made the whole slice 'head'. Measured above each channel's own
    # background, the head is the same disc as on a black background.
    volume = head_volume()
    offset = volume.copy()
    offset[..., 0] = np.where(volume[..., 0] > 0, 180, 76)
    assert list(background_level(offset)) == [76, 0, 0]
    assert np.array_equal(brain_interior(offset), brain_interior(volume))
    assert brain_interior(offset).mean() < 0.5


def test_brain_multi_keeps_the_small_tumor_that_lcc_throws_away_for_the_rim():
    pred, truth, arc = tumor_and_rim()
    assert int(pred[:, arc].sum()) == 300  # the rim component is the larger one
    inside = brain_interior(head_volume())
    prob = np.where(pred, 0.9, 0.05).astype(np.float16)
    kept_lcc = largest_component_3d(pred)
    kept_brain = brain_components_3d(pred, prob, inside)
    assert not (kept_lcc & truth).any()  # LCC kept the rim
    assert np.array_equal(kept_brain, truth)  # the brain rule kept exactly the tumor
    # All components on the rim: the heaviest of them is kept, never an empty prediction.
    rim_only = pred & ~truth
    assert np.array_equal(brain_components_3d(rim_only, prob, inside), largest_component_3d(rim_only))


def test_brain_multi_keeps_a_tumor_that_touches_the_rim_false_positive():
    """Tumor and rim merged into one component, mostly outside the brain, beside a small false
    positive inside: the merged component weighs the tumor's 48 x 0.9 inside, the other 8 x 0.9,
    under half of it."""
    pred, truth, arc = tumor_and_rim()
    pred[2:5, 4:31, 32] = True  # a bridge from the tumor (rows 30-33) up to the rim arc: one component now
    pred[1, 40:42, 40:44] = True  # a small false positive inside the brain (8 voxels)
    inside = brain_interior(head_volume())
    prob = np.where(pred, 0.9, 0.0).astype(np.float16)
    kept = brain_components_3d(pred, prob, inside)
    assert (kept & truth).sum() == 48 and not kept[1, 40:42, 40:44].any()


def test_scores_count_the_patients_whose_tumor_the_post_processing_threw_away():
    pred, truth, _ = tumor_and_rim()
    v = PatientPrediction(prob=np.where(pred, 0.9, 0.0).astype(np.float16), pred=pred, truth=truth,
                          inside=brain_interior(head_volume()))
    volumes, patients = {0: v}, ["P"]
    lcc, kept = score_volumes(volumes, patients, postprocess="lcc", spacing=None)
    brain, _ = score_volumes(volumes, patients, postprocess="brain-multi", spacing=None)
    raw, _ = score_volumes(volumes, patients, postprocess="none", spacing=None)
    assert lcc["tumor_lost_patients"] == ["P"] and lcc["dice_per_volume_mean"] == 0.0
    assert brain["tumor_lost_patients"] == [] and brain["dice_per_volume_mean"] == 1.0
    # Raw: TP 48, FP 300, FN 0 -> Dice 2 * 48 / (2 * 48 + 300).
    assert raw["dice_per_volume_mean"] == pytest.approx(96 / 396)
    assert not (kept[0] & truth).any()


def tumor_and_inner_rivals() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tumor of ``tumor_and_rim`` (48 voxels at p 0.9: mass 43.2) and its rim arc, plus two false
    components inside the brain: a rival of 60 voxels at p 0.9 (mass 54) and a speck of 20 (mass 18)."""
    pred, truth, _ = tumor_and_rim()
    pred[1:4, 40:44, 20:25] = True  # the rival: 3 x 4 x 5 = 60 voxels, 6 px from the tumor
    pred[4, 20:24, 40:45] = True  # the speck: 4 x 5 = 20 voxels
    return pred, truth, np.where(pred, 0.9, 0.0).astype(np.float16)


def test_brain_multi_keeps_a_tumor_that_an_inner_false_positive_outweighs():
    """Masses inside the brain: rival 54, tumor 43.2, speck 18, rim 0. One component (fraction 1)
    would be the rival alone; brain-multi keeps every component of at least 0.5 x 54 = 27: the
    rival and the tumor."""
    pred, truth, prob = tumor_and_inner_rivals()
    inside = brain_interior(head_volume())
    rival = np.zeros_like(pred)
    rival[1:4, 40:44, 20:25] = True
    assert np.array_equal(brain_components_3d(pred, prob, inside, fraction=1.0), rival)
    assert np.array_equal(brain_components_3d(pred, prob, inside), truth | rival)
    # 0.9 x 54 = 48.6 > 43.2: only the rival; 0.3 x 54 = 16.2 <= 18: the speck too. The rim never.
    assert np.array_equal(brain_components_3d(pred, prob, inside, fraction=0.9), rival)
    speck = np.zeros_like(pred)
    speck[4, 20:24, 40:45] = True
    assert np.array_equal(brain_components_3d(pred, prob, inside, fraction=0.3), truth | rival | speck)
    with pytest.raises(ValueError, match="fraction"):
        brain_components_3d(pred, prob, inside, fraction=0.0)


def test_brain_multi_keeps_a_tumor_sized_component_that_a_rival_outweighs_twice():
    """A tumor of 80 voxels and a rival of 200, both at p 0.875 (exact in float16) inside the brain:
    masses 70 and 175. 0.5 x 175 = 87.5 > 70, so the fraction alone drops the tumor; the floor,
    1,000 at 256 x 256 scaled to 64 x 64 slices (1000 x 4096 / 65536 = 62.5), keeps it. On
    128 x 128 slices the floor is 250 and the tumor goes again. The speck (mass 17.5) stays dropped."""
    for size, kept_tumor in ((64, True), (128, False)):
        tumor, rival, speck = (np.zeros((6, size, size), bool) for _ in range(3))
        tumor[1:5, 30:34, 28:33] = True  # 4 x 4 x 5 = 80 voxels
        rival[1:3, 40:50, 20:30] = True  # 2 x 10 x 10 = 200 voxels
        speck[5, 20:24, 40:45] = True  # 20 voxels
        pred = tumor | rival | speck
        prob = np.where(pred, 0.875, 0.0).astype(np.float16)
        inside = np.ones_like(pred)
        expected = rival | tumor if kept_tumor else rival
        assert np.array_equal(brain_components_3d(pred, prob, inside), expected)
        # An explicit floor overrides the default; infinity is the rule without one.
        assert np.array_equal(brain_components_3d(pred, prob, inside, floor=np.inf), rival)
        assert np.array_equal(brain_components_3d(pred, prob, inside, floor=17.5), pred)


def test_brain_multi_keeps_the_small_tumor_over_the_rim_and_counts_no_loss():
    pred, truth, _ = tumor_and_rim()
    v = PatientPrediction(prob=np.where(pred, 0.9, 0.0).astype(np.float16), pred=pred, truth=truth,
                          inside=brain_interior(head_volume()))
    multi, kept = score_volumes({0: v}, ["P"], postprocess="brain-multi", spacing=None)
    assert np.array_equal(kept[0], truth) and multi["tumor_lost_patients"] == []
    pred, truth, prob = tumor_and_inner_rivals()
    v = PatientPrediction(prob=prob, pred=pred, truth=truth, inside=brain_interior(head_volume()))
    multi, _ = score_volumes({0: v}, ["P"], postprocess="brain-multi", spacing=None)
    # TP 48, FP 60 (the rival), FN 0 -> Dice 96 / (96 + 60).
    assert multi["tumor_lost_patients"] == [] and multi["dice_per_volume_mean"] == pytest.approx(96 / 156)


def test_fill_slice_holes_fills_what_each_slice_encloses_and_nothing_open():
    volume = np.zeros((3, 12, 12), bool)
    volume[0, 2:7, 2:7] = True
    volume[0, 3:6, 3:6] = False  # slice 0: a closed ring around 9 background pixels
    volume[1] = volume[0]
    volume[1, 4, 2] = False  # slice 1: the same ring, opened to the outside at one pixel
    volume[2, 4:8, 4] = volume[2, 4:8, 7] = volume[2, 4, 5:7] = volume[2, 7, 5:7] = True  # 2 x 2 hole
    filled = fill_slice_holes(volume)
    expected = volume.copy()
    expected[0, 3:6, 3:6] = True
    expected[2, 5:7, 5:7] = True
    assert np.array_equal(filled, expected)
    assert fill_slice_holes(np.zeros((0, 4, 4), bool)).shape == (0, 4, 4)


def test_brain_multi_fills_a_cystic_lesion_whose_rim_alone_was_found():
    """The truth, an 8 x 8 square on slices 1-3 (192 voxels); the prediction, its rim without the
    4 x 4 centre (144 voxels), a tube whose hole is open along z through the empty slices 0 and 4,
    so only a per-slice fill closes it. Raw: TP 144, FN 48 -> Dice 288 / 336; brain-multi fills
    the centres: Dice 1."""
    truth = np.zeros((5, 64, 64), bool)
    truth[1:4, 28:36, 28:36] = True
    pred = truth.copy()
    pred[1:4, 30:34, 30:34] = False
    v = PatientPrediction(prob=np.where(pred, 0.9, 0.0).astype(np.float16), pred=pred, truth=truth,
                          inside=np.ones_like(pred))
    raw, _ = score_volumes({0: v}, ["P"], postprocess="none", spacing=None)
    multi, kept = score_volumes({0: v}, ["P"], postprocess="brain-multi", spacing=None)
    assert raw["dice_per_volume_mean"] == pytest.approx(288 / 336)
    assert multi["dice_per_volume_mean"] == 1.0 and np.array_equal(kept[0], truth)


def dome_volume() -> np.ndarray:
    """(6, 64, 64, 3) uint8: the top of a head. Discs of radius 28 (slices 0-3), 20 (slice 4) and 10
    (slice 5), as a head's slices shrink towards its top."""
    yy, xx = np.mgrid[:64, :64]
    radii = (28, 28, 28, 28, 20, 10)
    heads = np.stack([(yy - 32) ** 2 + (xx - 32) ** 2 <= r**2 for r in radii])
    return np.where(heads, 120, 0).astype(np.uint8)[..., None].repeat(3, -1)


def test_overlays_draw_a_slice_with_only_a_false_positive(tmp_path, monkeypatch):
    drawn = []
    real = reports.overlay_slice
    monkeypatch.setattr(reports, "overlay_slice", lambda f, t, p: drawn.append((t.any(), p.any())) or real(f, t, p))
    truth = np.zeros((4, 16, 16), bool)
    pred = np.zeros_like(truth)
    truth[1, 4:8, 4:8] = pred[1, 5:8, 5:8] = True  # slice 1: tumor, found
    truth[2, 4:8, 4:8] = True  # slice 2: tumor, missed
    pred[3, 10:12, 10:12] = True  # slice 3: a false positive and no tumor
    paths = reports.write_overlays(tmp_path, {0: (pred, truth)}, {0: np.full((4, 16, 16), 100, np.uint8)},
                                   {0: [1, 2, 3, 4]}, ["P"])
    assert drawn == [(True, True), (True, False), (False, True)]  # slice 0 (nothing) is left out
    assert paths[0].is_file()


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_folder_as_checkpoint_is_refused_in_one_line(tmp_path, capsys, command):
    """A cv folder is not a model (its fold models are no longer averaged): the error says which file to pass."""
    (tmp_path / "cv" / "fold-0").mkdir(parents=True)
    (tmp_path / "in").mkdir()
    out = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")] if command == "predict" else []
    assert main([command, "--checkpoint", str(tmp_path / "cv"), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "cv") in err and "fold-K/last.pt" in err
    assert not (tmp_path / "o").exists()


def test_the_end_of_run_table_lines_up_every_rule_name():
    from evaluation import POSTPROCESSING, format_metrics

    values = {k: 0.5 for k in ("dice_per_volume_mean", "dice_per_volume_median", "iou_per_volume_mean", "dice_global",
                               "iou_global", "dice_per_slice_tumor_mean", "precision", "recall")}
    metrics = {"patients": 1, "slices": 2, "tumor_slices": 1, "postprocess": "brain-multi", "threshold": 0.5,
               "hd95_px_mean": 1.0, "hd95_undefined_patients": 0, **values,
               "postprocessing": {name: {"dice_per_volume_mean": 0.25, "dice_per_volume_median": 0.75,
                                         "tumor_lost_patients": []} for name in POSTPROCESSING}}
    rows = format_metrics(metrics, "t").splitlines()[-len(POSTPROCESSING):]
    assert [r.split()[0] for r in rows] == list(POSTPROCESSING)
    assert len({r.index("0.2500") for r in rows}) == 1  # the numbers start in one column
