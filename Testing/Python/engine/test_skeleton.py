"""Bone-only CTs (engine/skeleton.py): told apart from CTs, MRIs and raw values; their vertebrae found
in the bone and named by the ribs and the sacrum, every label flagged for checking."""
import numpy as np
import pytest
from conftest import REALCT
from test_landmarks import make_phantom
from VertebraIDLib.engine.skeleton import is_bone_only, locate_in_skeleton
from VertebraIDLib.engine.vertebrae import FLAGGED_CONFIDENCE, Vertebra
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.evaluation.metrics import evaluate_case
from VertebraIDLib.io.cases import iter_cases
from VertebraIDLib.io.images import read_image


@pytest.fixture(scope="module")
def column():
    """The landmarks' synthetic column: 4 rib-bearing vertebrae, 5 with transverse processes, a sacrum."""
    return make_phantom(n_rib=4, n_tp=5, n_sac=2)


def skeleton_of(ct: Volume) -> Volume:
    return Volume(np.where(ct.array >= 150, ct.array, 0).astype(np.float32), ct.affine)


def test_a_skeleton_is_told_apart_from_a_ct_an_mri_and_raw_values(column):
    ct, _ = column
    assert is_bone_only(skeleton_of(ct))
    assert not is_bone_only(ct)
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, ct.shape3[0]), np.linspace(-1, 1, ct.shape3[1]), indexing="ij")
    inside = (x ** 2 + y ** 2 < 0.8)[:, :, None] & np.ones(ct.shape3, bool)
    mri = np.where(inside, rng.uniform(1, 800, ct.shape3), 0).astype(np.float32)  # background 0, tissue from 1 up
    assert not is_bone_only(Volume(mri, ct.affine))
    raw = (ct.array + 1024).astype(np.float32)  # unscaled values: air near 0, the body far above bone's HU
    assert not is_bone_only(Volume(raw, ct.affine))


def test_the_vertebrae_of_a_skeleton_are_found_and_named_by_its_ribs(column):
    ct, centres = column
    result = locate_in_skeleton(skeleton_of(ct))
    truth = [Vertebra(name, np.array([0.0, 20.0, z])) for name, (_, z) in
             zip(["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"], centres)]
    evaluation = evaluate_case(result.vertebrae, truth, metric="spineweb")
    assert evaluation.num_identified == len(truth), [(v.label, v.position.round()) for v in result.vertebrae]
    assert all(v.confidence <= FLAGGED_CONFIDENCE for v in result.vertebrae)  # every label flagged for checking


def test_a_skeleton_without_a_spine_gets_one_sentence(column):
    ct, _ = column
    block = np.zeros(ct.shape3, np.float32)
    block[40:60, 40:60, 20:80] = 600.0  # bone, but no canal and no vertebrae
    with pytest.raises(VertebraIDError, match="spinal canal"):
        locate_in_skeleton(Volume(block, ct.affine))


@pytest.mark.slow
@pytest.mark.realdata
def test_a_real_skeleton_is_named_with_every_label_flagged(shared_data):
    case = next(c for c in iter_cases(REALCT) if c.name == "ts_s0328_bone")  # TotalSegmentator labels T10..S1
    ct = read_image(case.paths["image"])
    assert is_bone_only(ct)
    result = locate_in_skeleton(ct)
    evaluation = evaluate_case(result.vertebrae, case.truth, metric="spineweb")
    # T10 is a sliver at the scan's top; T11..L5 are named by the ribs of T11 and T12 and the empty discs
    assert evaluation.num_identified >= 6, [(v.label, v.position.round()) for v in result.vertebrae]
    assert all(v.confidence <= FLAGGED_CONFIDENCE for v in result.vertebrae)
