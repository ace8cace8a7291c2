"""Tests for promptseg.data.datasets, splits and the sample bank, on the real shared data."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from promptseg.data.bank import ABSENT, DOMAIN, PRESENT, UNKNOWN, Bank
from promptseg.data.datasets import (
    ABDOMEN,
    BRAIN,
    BRAIN_LABELS,
    DATASET_FOLDERS,
    EXTRA_TRAIN_FOLDERS,
    KINDS,
    SPLIT_NAMES,
    TUNE_RULES,
    Case,
    brain_ids,
    btcv_ids,
    chaos_ids,
    load_brain,
    load_btcv,
    load_cases,
    load_chaos,
    load_lits,
    load_splits,
    make_splits,
    splits_sha256,
)
from promptseg.preprocess import Preprocessing, resize_nearest
from promptseg.prompts import TARGETS


@pytest.fixture(scope="module")
def roots(data_root: Path) -> dict[str, Path]:
    return {kind: data_root / folder for kind, folder in DATASET_FOLDERS.items()}


@pytest.fixture(scope="module")
def chaos_cases(roots) -> list[Case]:
    return list(load_chaos(roots["chaos-mr"]))


@pytest.fixture(scope="module")
def brain_table(roots) -> dict[int, dict]:
    with open(roots["brain-tumor"] / "labels.csv", newline="") as fh:
        return {int(Path(r["file"]).stem): r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def brain_sample(roots, brain_table) -> list[Case]:
    """Every 10th brain slice (61 cases over the whole file range)."""
    ids = set(sorted(brain_table)[::10])
    return list(load_brain(roots["brain-tumor"], ids))


def _check_case(case: Case, kind: str) -> None:
    assert case.dataset == kind
    assert case.image.ndim == 3 and case.image.dtype == np.float32
    assert case.image.shape[0] >= 1
    assert case.masks, case.case_id
    for target, mask in case.masks.items():
        assert target in TARGETS, target
        assert mask.dtype == bool, (case.case_id, target)
        assert mask.shape == case.image.shape, (case.case_id, target)
    assert case.is_volume == (kind in ("chaos-mr", "lits-ct"))
    assert len(case.spacing) == 3


# --------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("kind", KINDS)
def test_each_loader_yields_well_formed_cases(roots, kind):
    cases = list(itertools.islice(load_cases(kind, roots[kind]), 3))
    assert cases
    for case in cases:
        _check_case(case, kind)
    assert len({c.case_id for c in cases}) == len(cases)


def test_brain_cases_have_one_tumour_mask_matching_labels_csv(brain_sample, brain_table):
    assert len(brain_sample) >= 60
    seen = set()
    for case in brain_sample:
        _check_case(case, "brain-tumor")
        n = int(case.case_id.split("/")[1])
        row = brain_table[n]
        expected = BRAIN_LABELS[int(row["label"])]
        assert expected == row["label_name"].replace("pituitary", "pituitary tumour")
        non_empty = [t for t, m in case.masks.items() if m.any()]
        assert non_empty == [expected], (case.case_id, non_empty)
        assert case.meta["label"] == expected
        assert set(case.masks) == set(TARGETS)  # every other target is a true negative
        assert case.image.shape[0] == 1 and case.image.shape[1] in (256, 512)
        assert 0 <= case.image.min() and case.image.max() <= 255
        seen.add(expected)
    assert seen == set(BRAIN)


def test_chaos_volumes_are_las_and_complete(chaos_cases):
    import nibabel as nib

    assert len(chaos_cases) == 15
    for case in chaos_cases:
        _check_case(case, "chaos-mr")
        assert nib.aff2axcodes(case.meta["affine"]) == ("L", "A", "S")
        assert case.image.shape[1:] == (256, 256)
        assert case.spacing == pytest.approx((7.7, 1.25, 1.25), abs=0.05)
        for organ in ABDOMEN:
            assert case.masks[organ].any(), (case.case_id, organ)
        for absent in (*BRAIN, "liver tumour"):
            assert not case.masks[absent].any()
        # Labels are exclusive: no voxel belongs to two organs.
        total = sum(case.masks[o].astype(np.int8) for o in ABDOMEN)
        assert total.max() == 1


def _mean_row(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())  # (Z, H, W): axis 1 is the row


def test_chaos_orientation_convention(chaos_cases):
    """Rows run patient right -> left: liver and right kidney at lower rows."""
    for case in chaos_cases:
        m = case.masks
        assert _mean_row(m["liver"]) < _mean_row(m["spleen"]), case.case_id
        assert _mean_row(m["right kidney"]) < _mean_row(m["left kidney"]), case.case_id
        # The same fact from the affine: in RAS world coordinates +x is the patient's right.
        affine = case.meta["affine"]

        def world_x(mask: np.ndarray, affine: np.ndarray = affine) -> float:
            z, r, c = np.nonzero(mask)
            return float((affine[:3, :3] @ np.stack([r, c, z]).mean(axis=1) + affine[:3, 3])[0])

        assert world_x(m["liver"]) > world_x(m["spleen"]), case.case_id
        assert world_x(m["right kidney"]) > world_x(m["left kidney"]), case.case_id


@pytest.fixture(scope="module")
def btcv_cases(roots) -> list[Case]:
    return list(load_btcv(roots["btcv-ct"], {1}))


def test_btcv_absent_organs_are_negatives(roots, btcv_cases):
    files = set()
    for path in (roots["btcv-ct"] / "img").glob("image_SABS_*.png"):
        _, _, vol, slice_k, organ = path.stem.split("_", 4)
        files.add((int(vol), int(slice_k.removeprefix("slice")), organ))
    assert btcv_cases
    organ_files = {
        "liver": "liver",
        "spleen": "spleen",
        "left kidney": "kidney_left",
        "right kidney": "kidney_right",
    }
    negatives = 0
    for case in btcv_cases:
        _check_case(case, "btcv-ct")
        vol, k = case.meta["volume"], case.meta["slice"]
        assert vol == 1
        assert "liver tumour" not in case.masks  # not annotated in BTCV
        for organ, tag in organ_files.items():
            has_file = (vol, k, tag) in files
            assert organ in case.masks
            assert case.masks[organ].any() == has_file, (case.case_id, organ)
            negatives += not has_file
        for brain in BRAIN:
            assert not case.masks[brain].any()
    assert negatives > 0


def test_btcv_orientation_convention(btcv_cases):
    pairs = [("liver", "spleen"), ("right kidney", "left kidney")]
    checked = 0
    for case in btcv_cases:
        for low, high in pairs:
            if case.masks[low].any() and case.masks[high].any():
                assert _mean_row(case.masks[low]) < _mean_row(case.masks[high]), case.case_id
                checked += 1
    assert checked >= 10


def test_lits_targets(roots):
    (case,) = list(load_lits(roots["lits-ct"]))
    _check_case(case, "lits-ct")
    assert case.image.shape == (128, 128, 128)
    assert case.modality == "ct"
    assert case.image.min() < -500 and case.image.max() > 100  # Hounsfield units
    assert {"liver", "liver tumour"} <= set(case.masks)
    for absent in ("spleen", "left kidney", "right kidney"):
        assert absent not in case.masks
    liver, tumour = case.masks["liver"], case.masks["liver tumour"]
    assert liver.any() and tumour.any()
    assert not (tumour & ~liver).any()  # the tumour lies inside the liver mask
    assert case.meta["orientation_known"] is False


# --------------------------------------------------------------------------- splits


@pytest.fixture(scope="module")
def splits(data_root) -> dict:
    return make_splits(data_root)


def test_committed_splits_equal_make_splits(data_root, splits):
    assert load_splits() == json.loads(json.dumps(splits))
    assert make_splits(data_root) == splits  # deterministic


def test_packaged_splits_file_names_nothing_of_btcv_or_lits():
    """Licence: the BTCV/LiTS splits are rules in code (RULE_SPLITS), not shipped data."""
    from promptseg.data.datasets import RULE_SPLITS, SPLITS_FILE

    pinned = json.loads(SPLITS_FILE.read_text())
    assert set(pinned) == {"brain-tumor", "chaos-mr"}
    assert "btcv" not in SPLITS_FILE.read_text() and "lits" not in SPLITS_FILE.read_text()
    assert {k: load_splits()[k] for k in RULE_SPLITS} == RULE_SPLITS


@pytest.mark.parametrize("kind", ["brain-tumor", "chaos-mr", "btcv-ct"])
def test_split_train_val_disjoint_and_complete(roots, splits, kind):
    train, val = set(splits[kind]["train"]), set(splits[kind]["val"])
    assert train and val
    assert not train & val
    every = {
        "brain-tumor": lambda: brain_ids(roots["brain-tumor"]),
        "chaos-mr": lambda: chaos_ids(roots["chaos-mr"]),
        "btcv-ct": lambda: [1, 5, 7, 15, 9, 20],  # 9 and 20: btcv-ct-slices-extra
    }[kind]()
    assert train | val == set(every)


def test_lits_split_slices_do_not_overlap(splits):
    (t0, t1), (v0, v1) = splits["lits-ct"]["train"]["slices"], splits["lits-ct"]["val"]["slices"]
    assert 0 <= t0 < t1 < v0 < v1 <= 128


def test_brain_val_is_contiguous_blocks_with_every_class(splits, brain_table):
    ids = sorted(brain_table)
    val = set(splits["brain-tumor"]["val"])
    flags = [n in val for n in ids]
    runs = [key for key, _ in itertools.groupby(flags)].count(True)
    assert runs == 4  # four contiguous blocks of file numbers
    assert 0.15 < len(val) / len(ids) < 0.25
    for part in ("train", "val"):
        labels = {brain_table[n]["label"] for n in splits["brain-tumor"][part]}
        assert labels == {"1", "2", "3"}, part


def test_chaos_split_by_patient(roots, splits):
    val = splits["chaos-mr"]["val"]
    cases = list(load_cases("chaos-mr", roots["chaos-mr"], "val"))
    assert sorted(c.case_id for c in cases) == sorted(f"chaos/{p}" for p in val)
    assert all(c.image.shape[0] > 20 for c in cases)  # whole volumes, never single slices


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_load_cases_split_filtering(roots, splits, kind, split):
    cases = list(itertools.islice(load_cases(kind, roots[kind], split), 4))
    assert cases
    chosen = splits[kind][split]
    for case in cases:
        if kind == "brain-tumor":
            assert int(case.case_id.split("/")[1]) in chosen
        elif kind == "chaos-mr":
            assert int(case.case_id.split("/")[1]) in chosen
        elif kind == "btcv-ct":
            assert case.meta["volume"] in chosen
        else:
            lo, hi = chosen["slices"]
            assert case.image.shape[0] == hi - lo


def test_load_cases_errors(roots, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind 'ct-org'"):
        load_cases("ct-org", roots["lits-ct"])
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_cases("chaos-mr", roots["chaos-mr"], "test")
    with pytest.raises(FileNotFoundError, match="dataset folder not found") as info:
        load_cases("chaos-mr", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    with pytest.raises(FileNotFoundError, match="image_<pid>.nii.gz") as info:
        list(load_cases("chaos-mr", tmp_path))
    assert str(tmp_path) in str(info.value)


# --------------------------------------------------------------------------- tune split, extras


@pytest.fixture(scope="module")
def split_case_ids(roots) -> dict[str, dict[str, list[str]]]:
    """Case ids of every split of every dataset, read with the real loaders."""
    return {
        kind: {
            split: [c.case_id for c in load_cases(kind, roots[kind], split)]
            for split in SPLIT_NAMES
        }
        for kind in KINDS
    }


def _extra_root(roots, kind: str) -> Path:
    return roots[kind].parent / EXTRA_TRAIN_FOLDERS[kind]


@pytest.mark.parametrize("kind", ["brain-tumor", "chaos-mr", "btcv-ct"])
def test_train_tune_val_are_pairwise_disjoint(split_case_ids, kind):
    parts = {split: set(ids) for split, ids in split_case_ids[kind].items()}
    for split, ids in split_case_ids[kind].items():
        assert len(ids) == len(parts[split]), f"{kind}/{split} repeats a case"
    for a, b in itertools.combinations(SPLIT_NAMES, 2):
        assert not parts[a] & parts[b], (kind, a, b, sorted(parts[a] & parts[b])[:5])
    assert parts["train"] and parts["tune"] and parts["val"]


def test_lits_has_no_tune_split(split_case_ids, roots):
    """One volume, split by slice ranges (see test_lits_split_slices_do_not_overlap)."""
    assert split_case_ids["lits-ct"]["tune"] == []
    assert len(split_case_ids["lits-ct"]["train"]) == len(split_case_ids["lits-ct"]["val"]) == 1
    assert list(load_cases("lits-ct", roots["lits-ct"], "tune")) == []


def test_brain_extras_join_train_or_tune_never_val(roots, split_case_ids):
    extra = {f"brain/{n}" for n in brain_ids(_extra_root(roots, "brain-tumor"))}
    main = {f"brain/{n}" for n in brain_ids(roots["brain-tumor"])}
    assert len(extra) == 759 and not extra & main
    parts = {split: set(ids) for split, ids in split_case_ids["brain-tumor"].items()}
    assert extra <= parts["train"] | parts["tune"]
    assert not extra & parts["val"]
    lo, hi = TUNE_RULES["brain-tumor"]["extra_file_numbers"]
    tune = {c for c in extra if lo <= int(c.split("/")[1]) <= hi}
    assert parts["tune"] == tune  # the tune split is this range of the extras, nothing else
    assert parts["train"] == (main - parts["val"]) | (extra - tune)


def test_btcv_extra_volumes_join_train_or_tune_never_val(roots, split_case_ids):
    assert btcv_ids(_extra_root(roots, "btcv-ct")) == [9, 20]

    def volumes(split: str) -> set[int]:
        return {int(c.split("/")[1]) for c in split_case_ids["btcv-ct"][split]}

    assert volumes("train") == {1, 5, 7, 20}
    assert volumes("tune") == set(TUNE_RULES["btcv-ct"]) == {9}
    assert volumes("val") == {15}


@pytest.mark.parametrize("kind", ["brain-tumor", "btcv-ct"])
@pytest.mark.parametrize("split", ["train", "tune"])
def test_extra_folder_given_as_the_root_loads_each_case_once(roots, split_case_ids, kind, split):
    """`promptseg evaluate --data .../btcv-ct-slices-extra --split tune` reads the folder once."""
    ids = [c.case_id for c in load_cases(kind, _extra_root(roots, kind), split)]
    assert ids and len(ids) == len(set(ids)), f"{kind}/{split} repeats a case"
    assert set(ids) <= set(split_case_ids[kind][split])
    assert list(load_cases(kind, _extra_root(roots, kind), "val")) == []  # extras: never val


def test_chaos_tune_is_whole_training_patients(split_case_ids):
    ids = {
        split: {int(c.split("/")[1]) for c in cases}
        for split, cases in split_case_ids["chaos-mr"].items()
    }
    assert ids["tune"] == set(TUNE_RULES["chaos-mr"])
    assert ids["tune"] <= set(load_splits()["chaos-mr"]["train"])
    assert ids["train"] == set(load_splits()["chaos-mr"]["train"]) - ids["tune"]


def test_val_ids_are_those_of_partition_json(split_case_ids):
    """The validation split is as it was before the extras and the tune split existed."""
    from promptseg.data.datasets import RULE_SPLITS, SPLITS_FILE

    pinned = json.loads(SPLITS_FILE.read_text())
    val = {kind: set(ids["val"]) for kind, ids in split_case_ids.items()}
    assert val["brain-tumor"] == {f"brain/{n}" for n in pinned["brain-tumor"]["val"]}
    assert val["chaos-mr"] == {f"chaos/{n}" for n in pinned["chaos-mr"]["val"]}
    assert {int(c.split("/")[1]) for c in val["btcv-ct"]} == set(RULE_SPLITS["btcv-ct"]["val"])
    assert RULE_SPLITS["lits-ct"]["val"] == {"slices": [96, 128]}


def test_splits_sha256_covers_tune_rules_and_extra_folders(monkeypatch):
    import promptseg.data.datasets as datasets

    base = splits_sha256()
    assert len(base) == 64 and splits_sha256() == base
    monkeypatch.setitem(datasets.TUNE_RULES, "chaos-mr", [37])
    moved = splits_sha256()
    assert moved != base
    monkeypatch.setitem(datasets.TUNE_RULES, "btcv-ct", [20])
    assert splits_sha256() not in (base, moved)
    monkeypatch.undo()
    assert splits_sha256() == base
    monkeypatch.setitem(datasets.EXTRA_TRAIN_FOLDERS, "btcv-ct", "btcv-ct-slices-more")
    assert splits_sha256() != base


# --------------------------------------------------------------------------- bank


@pytest.fixture(scope="module")
def small_bank(roots, chaos_cases, brain_sample) -> tuple[Bank, list[Case]]:
    glioma = next(c for c in brain_sample if c.meta["label"] == "glioma")
    cases = [glioma, chaos_cases[0]]
    bank = Bank(64)
    pre = Preprocessing(resolution=64)
    for case in cases:
        bank.add_case(case, pre)
    return bank.finalize(), cases


def test_bank_images_and_masks(small_bank):
    bank, cases = small_bank
    n_slices = sum(c.image.shape[0] for c in cases)
    assert bank.images.shape == (n_slices, 64, 64) and bank.images.dtype == np.float32
    assert bank.images.min() >= 0 and bank.images.max() <= 1
    assert bank.masks.dtype == bool and bank.masks.shape[1:] == (64, 64)
    assert len(bank.positives()) == bank.masks.shape[0]


def test_bank_samples_follow_the_masks(small_bank):
    bank, cases = small_bank
    slices = [(c, z) for c in cases for z in range(c.image.shape[0])]
    seen = set()
    for s in bank.samples:
        case, z = slices[s.image]
        assert s.dataset == case.dataset
        assert (s.image, s.target) not in seen  # one sample per (slice, target)
        seen.add((s.image, s.target))
        expected = resize_nearest(case.masks[s.target][z], (64, 64))
        if s.positive:
            assert s.hard
            assert bank.masks[s.mask].any()
            np.testing.assert_array_equal(bank.masks[s.mask], expected)
        else:
            assert s.mask == -1
            assert not case.masks[s.target][z].any()  # a true negative at native resolution
            assert s.hard == (s.target in DOMAIN[case.dataset])
    positives = sum(
        resize_nearest(case.masks[t][z], (64, 64)).any() for case, z in slices for t in case.masks
    )
    assert len(bank.positives()) == positives


def test_bank_hard_and_easy_negatives(small_bank):
    bank, _ = small_bank
    brain_hard = {s.target for s in bank.negatives(True) if s.dataset == "brain-tumor"}
    brain_easy = {s.target for s in bank.negatives(False) if s.dataset == "brain-tumor"}
    assert brain_hard == {"meningioma", "pituitary tumour"}  # same domain as the glioma
    assert brain_easy == set(ABDOMEN) | {"liver tumour"}
    chaos_hard = {s.target for s in bank.negatives(True) if s.dataset == "chaos-mr"}
    chaos_easy = {s.target for s in bank.negatives(False) if s.dataset == "chaos-mr"}
    assert "liver tumour" in chaos_hard and set(BRAIN) == chaos_easy
    assert chaos_hard <= set(ABDOMEN) | {"liver tumour"}
    assert {s.target for s in bank.positives() if s.dataset == "chaos-mr"} == set(ABDOMEN)


def test_bank_state_and_mask_index_per_image_and_target(small_bank, roots):
    bank, cases = small_bank
    assert bank.state.shape == bank.mask_index.shape == (len(bank.images), len(TARGETS))
    assert bank.state.dtype == np.int8 and bank.mask_index.dtype == np.int32
    state = np.full(bank.state.shape, UNKNOWN, np.int8)
    for s in bank.samples:
        column = TARGETS.index(s.target)
        state[s.image, column] = PRESENT if s.positive else ABSENT
        assert bank.mask_index[s.image, column] == s.mask
    np.testing.assert_array_equal(bank.state, state)
    assert (bank.mask_index[bank.state != PRESENT] == -1).all()
    assert bank.image_dataset == [c.dataset for c in cases for _ in range(c.image.shape[0])]
    assert bank.image_case == [c.case_id for c in cases for _ in range(c.image.shape[0])]

    # Targets a dataset does not annotate stay UNKNOWN (BTCV: liver tumour).
    btcv = Bank(32)
    btcv.add_case(next(iter(load_btcv(roots["btcv-ct"], {1}))), Preprocessing(resolution=32))
    btcv.finalize()
    assert btcv.state[0, TARGETS.index("liver tumour")] == UNKNOWN
    assert (btcv.state[0, [TARGETS.index(t) for t in BRAIN]] == ABSENT).all()


def test_bank_target_lost_in_the_resize_is_unknown():
    """A mask too small to survive the resize is neither a positive nor a true negative."""
    image = np.zeros((1, 256, 256), np.float32)
    masks = {t: np.zeros((1, 256, 256), bool) for t in TARGETS}
    masks["glioma"][0, 1, 1] = True
    case = Case("brain/0", "brain-tumor", "uint8", image, masks, (1.0, 1.0, 1.0), False)
    bank = Bank(32)
    bank.add_case(case, Preprocessing(resolution=32))
    bank.finalize()
    assert not resize_nearest(masks["glioma"][0], (32, 32)).any()  # the pixel is lost
    assert bank.state[0, TARGETS.index("glioma")] == UNKNOWN
    assert bank.state[0, TARGETS.index("meningioma")] == ABSENT
    assert not [s for s in bank.samples if s.target == "glioma"]
