"""Slices -> batches: split patients, the slice dataset, its samplers and DataLoaders.

Train and validation are split by patient, never by slice: neighbouring slices of one brain look
alike, so a slice-level split scores memory, not skill.
"""

from __future__ import annotations

import copy
import csv
import math
import multiprocessing
import os
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler

from data_preprocessing import (
    Preprocess,
    buda_square,
)
from data_files import (
    DATASET_URL,
    DATA_ENV_VAR,
    DEFAULT_LOCATIONS,
    DataIssues,
    DatasetError,
    FLAIR_CHANNEL,
    OTHER_MODALITIES,
    PatientVolume,
    find_data_dir,
    group_by_patient,
    scan_dataset,
)
from libraries import counted, first_names
from synthetic_data import SYNTHETIC_DIR, is_synthetic, make_synthetic_dataset

def check_val_fraction(val_fraction: float) -> None:
    """Refuse a --val-fraction that leaves no patient on one side."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1, got {val_fraction:g}")


def check_fold(folds: int, fold: int) -> None:
    """Refuse a K-fold choice that names no fold: K below 2, or a fold outside 0..K-1."""
    if folds < 2:
        raise DatasetError(f"--folds must be at least 2 (0: no folds), got {folds}")
    if not 0 <= fold < folds:
        raise DatasetError(f"--fold must be in 0..{folds - 1} for --folds {folds}, got {fold}")


def split_patients(
    patients: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded patient-level split into (train, validation), each sorted.

    The result depends only on the set of patient names, ``val_fraction`` and ``seed``.
    """
    patients = sorted(set(patients))
    check_val_fraction(val_fraction)
    if len(patients) < 2:
        raise DatasetError(
            f"found {counted(len(patients), 'patient')}; a patient-level split needs at least 2"
        )
    n_val = min(max(1, round(val_fraction * len(patients))), len(patients) - 1)
    # Imported here: scikit-learn takes 0.8 s to import, and only this split uses it.
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(patients, test_size=n_val, random_state=seed, shuffle=True)
    return sorted(train), sorted(val)


# The 10 validation patients of Buda et al.'s PyTorch release (brain-segmentation-pytorch),
# as folder-name prefixes (the folders add the scan date).
BUDA_VAL_PREFIXES = (
    "TCGA_HT_7616", "TCGA_CS_6668", "TCGA_CS_4944", "TCGA_HT_7879", "TCGA_DU_7014",
    "TCGA_DU_6408", "TCGA_DU_6404", "TCGA_DU_5851", "TCGA_CS_6667", "TCGA_HT_7692",
)


def match_patients(names: Sequence[str], patients: Sequence[str], source: str) -> list[str]:
    """Resolve patient names or prefixes (TCGA_CS_4944 for TCGA_CS_4944_20010208) to folder names.

    Raises DatasetError naming every name that matches no folder, or more than one.
    """
    found, missing, ambiguous = [], [], []
    for name in names:
        hits = [p for p in patients if p == name] or [p for p in patients if p.startswith(name + "_")]
        if len(hits) == 1:
            found.append(hits[0])
        else:
            (ambiguous if hits else missing).append(name)
    if missing or ambiguous:
        problems = []
        if missing:
            shown = first_names(missing, 5) + (f" ({len(missing)} in all)" if len(missing) > 5 else "")
            problems.append(f"no patient folder for {shown}")
        if ambiguous:
            problems.append(f"more than one folder for {', '.join(ambiguous)}")
        raise DatasetError(f"{source}: {'; '.join(problems)}; check the names against the dataset folder")
    return sorted(set(found))


def read_patient_list(spec: str, flag: str = "--val-patients") -> tuple[list[str], str]:
    """Patients given to ``flag``: a file of names (one per line or comma-separated), a table
    whose header has a ``patient`` column (this package's per_patient.csv, cv_patients.csv,
    predictions.csv: that column's names), or a comma list."""
    path = Path(spec).expanduser()
    if path.is_file():
        raw, source = path.read_bytes(), str(path)
        # Notepad's UTF-8 starts with a byte-order mark (utf-8-sig drops it); Windows PowerShell 5's
        # 'echo ... > list.txt' writes UTF-16, with its own.
        try:
            text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DatasetError(f"{flag} {spec}: not a text file; pass a file of patient names (one per line or "
                               "comma-separated) or a comma list of them") from None
    elif "/" in spec or path.suffix in (".txt", ".csv"):  # a patient's name has neither
        raise DatasetError(f"{flag} {spec}: no such file; pass a file of patient names or a comma list of them")
    else:
        text, source = spec, flag
    rows = list(csv.reader(text.splitlines()))
    header = [cell.strip() for cell in rows[0]] if rows else []
    if "patient" in header:
        column = header.index("patient")
        names = [row[column].strip() for row in rows[1:] if len(row) > column and row[column].strip()]
    else:
        text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # drop comments
        names = [n for n in re.split(r"[,\s]+", text) if n]
    if not names:
        raise DatasetError(f"{source}: no patient names given")
    return names, source


def kfold_split(patients: Sequence[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """Fold ``fold`` of a seeded patient-level K-fold split.

    The patients are put in a ``seed``-shuffled order and fold k validates on every K-th of them
    from position k: each patient is in exactly one validation fold, folds differ by at most one
    patient in size, and another seed gives other folds. (scikit-learn's GroupKFold, used before,
    ignores any shuffle: it ordered the folds itself, so every seed gave the same alphabetical folds.)
    """
    patients = sorted(set(patients))
    check_fold(folds, fold)
    if folds > len(patients):
        raise DatasetError(f"--folds {folds} is more than the {counted(len(patients), 'patient')} found")
    order = np.random.default_rng(seed).permutation(len(patients))
    val = {patients[i] for i in order[fold::folds]}
    return [p for p in patients if p not in val], sorted(val)


def choose_split(
    patients: Sequence[str], *, split: str, val_fraction: float, seed: int,
    val_patients: str = "", folds: int = 0, fold: int = 0,
) -> tuple[list[str], list[str]]:
    """(train, validation) patients: --val-patients, else --folds/--fold, else --split.

    ``split="none"`` trains on every patient and validates on none: the final model, once a
    recipe has been chosen by cross-validation, to be scored on other patients with ``evaluate``.
    """
    patients = sorted(set(patients))
    if val_patients:
        names, source = read_patient_list(val_patients)
        val = match_patients(names, patients, source)
    elif folds:
        return kfold_split(patients, folds, fold, seed)
    elif split == "buda":
        val = match_patients(BUDA_VAL_PREFIXES, patients, "--split buda")
    elif split == "random":
        return split_patients(patients, val_fraction, seed)
    elif split == "none":
        return patients, []
    else:
        raise DatasetError(f"--split must be random, buda or none, got {split!r}")
    train = [p for p in patients if p not in val]
    if not train:
        raise DatasetError("the validation split takes every patient; leave some for training")
    return train, val


def locate_data(data_dir: str, *, seed: int) -> tuple[Path, bool]:
    """The dataset root and whether it is synthetic. ``data_dir`` 'synthetic', or no dataset found,
    generates the synthetic dataset (SYNTHETIC_DIR); a folder generated earlier is synthetic too."""
    if data_dir != "synthetic":
        root = find_data_dir(data_dir or None)
        if root is not None:
            return root, is_synthetic(root)
        looked = ", ".join(f"./{location}" for location in DEFAULT_LOCATIONS)
        print(f"No LGG dataset found (--data-dir, ${DATA_ENV_VAR}, {looked}). Training on SYNTHETIC data instead; "
              f"for the real data: python engine.py download (then found by itself), or get it from {DATASET_URL} "
              "and pass --data-dir .../kaggle_3m")
    return make_synthetic_dataset(Path(SYNTHETIC_DIR), seed=seed), True


def pinned_data_dir(data_dir: str) -> str:
    """``data_dir`` as the absolute path of the dataset it finds now (a relative --data-dir, or
    $LGG_DATA_DIR and the default locations when it is empty), so that a run continued later, from
    another working folder or shell, reads the same patients. 'synthetic', and nothing found, stay
    as given: each run generates the synthetic set the same way."""
    if data_dir == "synthetic":
        return data_dir
    root = find_data_dir(data_dir or None)
    return str(root.resolve()) if root is not None else data_dir


def dataset_inventory(data_dir: str) -> dict[str, int] | None:
    """{patient: slices} of the dataset ``data_dir`` finds, from its file names alone (no pixel is
    read: a directory listing), or None for synthetic data. Two inventories that differ mean the
    folder changed: patients added or removed, slices added or removed."""
    if data_dir == "synthetic":
        return None
    root = find_data_dir(data_dir or None)
    if root is None:
        return None
    return {name: len(records) for name, records in group_by_patient(scan_dataset(root, DataIssues())).items()}


class LGGSlices(Dataset):
    """2D slices of several patient volumes.

    Each item is a dict with ``image`` (3, S, S) uint8, ``mask`` (1, S, S)
    uint8 {0, 1}, ``stats`` (4, C) float32, the volume's normalization statistics (``normalize``
    applies them on the device), ``patient`` (int index into ``self.patients``) and ``slice``
    (slice number). With ``full_mask=True`` it also holds ``full_mask`` (1, H, W) float32: the
    mask at the file's own resolution, which evaluation scores against so that metrics do not
    depend on ``image_size``.

    With ``modality_dropout`` p > 0 (training), each non-FLAIR channel of an item is, with
    chance p, replaced by the FLAIR channel together with its statistics: the item then looks
    exactly like a slice of a patient whose missing modality the dataset filled with FLAIR.
    This lives here rather than in albumentations because the statistics change with it.
    """

    def __init__(
        self,
        volumes: Sequence[PatientVolume],
        preprocess: Preprocess,
        *,
        full_mask: bool = False,
        modality_dropout: float = 0.0,
    ) -> None:
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout is a probability in [0, 1], got {modality_dropout}")
        self.modality_dropout = modality_dropout
        self.rng = np.random.default_rng(0)
        self.volumes = list(volumes)
        self.patients = [v.name for v in self.volumes]
        self.preprocess = preprocess
        self.full_mask = full_mask
        # (volume index, position in volume) for every slice, patients in order.
        self.index = [(p, i) for p, v in enumerate(self.volumes) for i in range(len(v.images))]
        self.has_tumor = (np.concatenate([v.masks.any(axis=(1, 2)) for v in self.volumes]) if volumes
                          else np.zeros(0, bool))
        self.stats = [v.stats.as_tensor() for v in self.volumes]  # (4, 3) once per volume, not per item
        self.shared: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see share_memory
        self.stream: int | None = None  # the augmentation stream this process is on (``EpochStream``)

    def share_memory(self) -> None:
        """Move every volume's images and masks into shared memory, once, for loader workers that
        do not fork (macOS, Windows). Pickled for such a worker, the dataset then carries handles to
        that memory instead of a copy of every volume, which each worker unpickled before (617 MB
        for the 66 shared patients). With 2 spawned workers over the 66 the first batch came after
        11.4 s, with 3.14 GB in all; now 6.1 s, most of it importing torch, and 1.91 GB (2-core AMD
        EPYC). The arrays become views of torch tensors in shared memory, whose pickling
        torch.multiprocessing handles on every platform."""
        if self.shared is not None:
            return
        self.shared = []
        for v in self.volumes:  # one volume at a time, each freed as soon as it is copied
            images, masks = (torch.from_numpy(np.ascontiguousarray(a)).share_memory_() for a in (v.images, v.masks))
            v.images, v.masks = images.numpy(), masks.numpy()
            self.shared.append((images, masks))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.shared is not None:  # the tensors in ``shared`` travel instead of the arrays
            state["volumes"] = [copy.copy(v) for v in self.volumes]
            for v in state["volumes"]:
                v.images = v.masks = v._interior = None  # the interior is the main process's cache
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.shared is not None:
            for v, (images, masks) in zip(self.volumes, self.shared):
                v.images, v.masks = images.numpy(), masks.numpy()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        if isinstance(i, tuple):  # (slice, stream) from a training loader: see EpochStream
            i, stream = i
            if stream != self.stream:
                self.start_stream(stream)
        p, j = self.index[i]
        vol = self.volumes[p]
        image, mask = vol.images[j], vol.masks[j]
        item: dict[str, torch.Tensor | int] = {"patient": p, "slice": vol.slice_numbers[j]}
        if vol.box is not None:  # 'buda': float32 at the model's size, as their network saw it
            image, mask, (top, left, side) = buda_square(image, mask, vol.box, self.preprocess.image_size)
            # Everything evaluation needs to paste a prediction back onto the original grid.
            item["box"] = torch.tensor([*vol.box, top, left, side])
        stats = self.stats[p]
        if self.modality_dropout > 0:
            image, stats = self._drop_modalities(image, stats)
        item["image"], item["mask"] = self.preprocess(image, mask)
        item["stats"] = stats
        if self.full_mask:
            item["full_mask"] = torch.from_numpy(vol.masks[j]).float().unsqueeze(0)
        return item

    def _drop_modalities(self, image: np.ndarray, stats: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Copies of (H, W, C) ``image`` and (4, C) ``stats`` with some channels replaced by FLAIR."""
        others = OTHER_MODALITIES.values()
        dropped = [c for c, u in zip(others, self.rng.random(len(others))) if u < self.modality_dropout]
        if not dropped:
            return image, stats
        image, stats = image.copy(), stats.clone()  # the volume in memory stays as it is
        image[..., dropped] = image[..., FLAIR_CHANNEL : FLAIR_CHANNEL + 1]
        stats[:, dropped] = stats[:, FLAIR_CHANNEL : FLAIR_CHANNEL + 1]
        return image, stats

    def reseed(self, seed: int) -> None:
        """Seed the augmentation streams (albumentations keeps its own RNG, apart from numpy's)."""
        self.preprocess.transform.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.stream = None

    def start_stream(self, stream: int) -> None:
        """Seed this process's augmentation from an epoch's ``stream``: the stream itself without
        workers, a seed drawn from (stream, worker) in a worker, so that workers differ."""
        info = torch.utils.data.get_worker_info()
        seed = stream if info is None else int(np.random.SeedSequence([stream, info.id]).generate_state(1)[0])
        if info is not None:  # the worker's global RNGs too, as ``seed_worker`` seeds them
            np.random.seed(seed)
            random.seed(seed)
        self.reseed(seed)
        self.stream = stream


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive every RNG of the worker from the loader's seed.

    torch gives each worker ``initial_seed() = base_seed + worker_id``, where base_seed comes
    from the loader's seeded generator, so workers differ from each other but are the same from
    run to run. A training loader's items then reseed the worker at each epoch (``EpochStream``).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


class EpochStream(Sampler[tuple[int, int]]):
    """A training sampler's indices, each paired with the epoch's augmentation ``stream``.

    Workers persist from epoch to epoch (each start costs seconds where they are spawned), so
    nothing reseeds them between epochs but the items they are asked for: the first item of a
    new stream reseeds the process that makes it (``LGGSlices.start_stream``). A worker makes
    the same batches of an epoch, in the same order, however many epochs came before, so an
    epoch's augmentation depends on its stream alone, which resuming a run relies on.
    """

    def __init__(self, sampler: Sampler[int], stream: int) -> None:
        self.sampler, self.stream = sampler, stream

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return ((i, self.stream) for i in self.sampler)


def worker_start_method() -> str:
    """How loader workers start: by fork on Linux, whatever Python's default, so that they share
    the volumes in memory and start at once; elsewhere as the platform starts processes ('spawn' on
    macOS and Windows). A worker started any other way (Python 3.14 made 'forkserver' Linux's
    default) imports torch and the package before its first item, and is handed the volumes through
    shared memory (``LGGSlices.share_memory``); workers then serve every epoch (``EpochStream``).
    With 2 workers over the 66 shared patients, spawned: 5.5 s before the first batch of the first
    epoch, 0.02 s in later ones, 1.91 GB in all; forked: 0.09 s, then 0.02 s, 1.24 GB (2-core AMD
    EPYC). Forking is how PyTorch's workers started on Linux under every Python before 3.14; since
    3.12 Python warns about forking a process that runs threads (a DeprecationWarning, hidden
    unless asked for)."""
    if sys.platform.startswith("linux"):
        return "fork"
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def default_num_workers(device: torch.device) -> int:
    """Loader workers for this machine (``--num-workers -1``): none on <= 2 cores, where they would
    take the model's cores, and none for a model on the CPU where workers cannot fork: there the
    input pipeline (about 1,500 slices/s on one core) takes a few percent of a training step at
    most, while each worker takes a core from the model, seconds to start and 0.3 GB of libraries
    (``worker_start_method``). Else up to 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus <= 2 or (device.type == "cpu" and worker_start_method() != "fork"):
        return 0
    return min(4, cpus - 1)


class ShardedSampler(Sampler[int]):
    """The training order for one rank of a distributed job.

    Every rank draws the same (seed + epoch)-seeded order, a permutation or, with ``weights``,
    weighted draws with replacement (tumor-aware sampling), pads it to a multiple of ``world``
    and takes every ``world``-th index from ``rank``: the ranks share one epoch without overlap.
    """

    def __init__(self, n: int, *, rank: int, world: int, seed: int, weights: torch.Tensor | None = None,
                 draws: int | None = None) -> None:
        self.n, self.rank, self.world, self.seed, self.weights = n, rank, world, seed, weights
        self.draws = n if draws is None else draws  # the whole job's draws per epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.draws / self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:  # as many permutations as the draws need, one after another
            order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(math.ceil(self.draws / self.n))])
            order = order[: self.draws].tolist()
        else:
            order = torch.multinomial(self.weights, self.draws, replacement=True, generator=g).tolist()
        order += order[: len(self) * self.world - self.draws]  # pad so every rank gets len(self)
        return iter(order[self.rank :: self.world])


def make_loader(
    dataset: LGGSlices,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
    tumor_weight: float = 1.0,
    steps: int = 0,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """A seeded DataLoader. Training shuffles and drops a last batch of 1 (BatchNorm needs 2);
    validation keeps every slice, in order.

    A training epoch is one pass over ``dataset``, or with ``steps`` > 0 exactly ``steps`` batches
    on each process, whatever the dataset's size (nnU-Net's fixed iterations per epoch): then
    training takes as long on 110 patients as on 36. With ``tumor_weight`` != 1, training draws
    slices with replacement, a slice with tumor ``tumor_weight`` times as likely as one without.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset.reseed(seed)
    if num_workers > 0 and worker_start_method() != "fork":
        dataset.share_memory()
    # The training order's own generator: with persistent workers the loader draws its workers'
    # base seed from ``generator`` on its first epoch only, which must not shift that epoch's order.
    # Without workers the two are one, as they always were.
    order = torch.Generator().manual_seed(seed) if num_workers > 0 else generator
    common = dict(num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=seed_worker, generator=generator,
                  multiprocessing_context=worker_start_method() if num_workers > 0 else None,
                  persistent_workers=num_workers > 0)
    if not train:
        # Every slice once, in order; a batch never spans two slice sizes, since each item carries
        # its mask at the file's own size (``full_mask``), and such tensors cannot be stacked.
        return DataLoader(dataset, batch_sampler=same_size_batches(dataset, batch_size), **common)
    draws = steps * batch_size * world if steps > 0 else len(dataset)
    weights = draw_weights(dataset, tumor_weight) if tumor_weight != 1.0 else None
    if world > 1:
        sampler = ShardedSampler(len(dataset), rank=rank, world=world, seed=seed, weights=weights, draws=draws)
    elif weights is not None:
        sampler = WeightedRandomSampler(weights, num_samples=draws, replacement=True, generator=order)
    else:
        sampler = RandomSampler(dataset, num_samples=draws, generator=order)
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochStream(sampler, seed),
                      drop_last=len(sampler) % batch_size == 1, **common)  # see steps_per_epoch


def start_epoch(loader: DataLoader, *, epoch: int, seed: int, stream: int) -> None:
    """Seed a training loader's next epoch from (``seed``, ``epoch``) and the augmentation
    ``stream`` alone, so that a resumed run repeats an interrupted epoch exactly."""
    loader.generator.manual_seed(seed + epoch)
    sampler = loader.sampler.sampler
    if isinstance(sampler, ShardedSampler):
        sampler.set_epoch(epoch)
    else:
        sampler.generator.manual_seed(seed + epoch)
    loader.sampler.stream = stream


def draw_weights(dataset: LGGSlices, tumor_weight: float) -> torch.Tensor:
    """How likely training is to draw each slice of ``dataset``, up to a common factor: a slice with
    tumor weighs ``tumor_weight`` (> 0: libraries.FLAG_RANGES) times one without."""
    return torch.where(torch.from_numpy(dataset.has_tumor), tumor_weight, 1.0).double()


def steps_per_epoch(slices: int, batch_size: int) -> int:
    """Optimizer steps in one training epoch of ``slices`` draws on one process: ``make_loader``
    drops a last batch of 1, which BatchNorm cannot train on."""
    return slices // batch_size + (slices % batch_size > 1)


def same_size_batches(dataset: LGGSlices, batch_size: int) -> list[list[int]]:
    """Consecutive indices of ``dataset`` in batches of at most ``batch_size``, cut where the slice size changes."""
    batches: list[list[int]] = []
    last = None
    for i, (p, _) in enumerate(dataset.index):
        size = dataset.volumes[p].masks.shape[1:]
        if not batches or size != last or len(batches[-1]) == batch_size:
            batches.append([])
        batches[-1].append(i)
        last = size
    return batches

