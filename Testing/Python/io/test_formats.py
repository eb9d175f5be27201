"""File formats: round trips, validation against the markups schema, real VerSe and VID files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA, SPECS
from VertebraIDLib.engine.anatomy import CHECK_COLOR, REGION_COLORS
from VertebraIDLib.engine.vertebrae import Vertebra, sort_by_level
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.io import formats
from VertebraIDLib.io.images import read_nifti

VERSE_DIR = SHARED_DATA / "realct" / "verse004_labels"
VERSE_CTD = VERSE_DIR / "sub-verse004_seg-subreg_ctd.json"
VERSE_MASK = VERSE_DIR / "sub-verse004_seg-vert_msk.nii.gz"
VID_DIR = SHARED_DATA / "vid" / "train"
VID_CASES = ("00Y57c9D9aoO", "062JCaPtCSw6", "09PTgwms2Y2K")


def sample_vertebrae() -> list[Vertebra]:
    # Deliberately not in anatomical order.
    return [
        Vertebra("L1", [1.23456, -20.5, -300.0], 0.912345, source_index=4),
        Vertebra("T12", [0.5, -15.25, -270.125], 0.5, locked=True),
        Vertebra("S1", [2.0, -5.0, -420.0], 0.75),
        Vertebra("C7", [-1.0, 10.0, 20.0], 1.0, source_index=0),
    ]


def assert_same_vertebrae(read, expected, atol=1e-3, check_confidence=True):
    assert [v.label for v in read] == [v.label for v in sort_by_level(list(expected))]
    by_label = {v.label: v for v in expected}
    for v in read:
        np.testing.assert_allclose(v.position, by_label[v.label].position, atol=atol)
        if check_confidence:
            assert v.confidence == pytest.approx(by_label[v.label].confidence, abs=1e-4)


# --------------------------------------------------------------------------- vertebrae JSON


@pytest.mark.parametrize("system", ["RAS", "LPS"])
def test_vertebrae_json_round_trip(tmp_path, system):
    path = tmp_path / "case.vertebrae.json"
    formats.write_vertebrae_json(path, sample_vertebrae(), coordinate_system=system, model="test-model")
    data = json.loads(path.read_text())
    assert data["coordinate_system"] == system
    assert data["model"] == "test-model"
    assert [e["label"] for e in data["vertebrae"]] == ["C7", "T12", "L1", "S1"]
    assert [e["index"] for e in data["vertebrae"]] == [7, 19, 20, 25]
    l1 = data["vertebrae"][2]
    sign = -1.0 if system == "LPS" else 1.0
    assert l1["position"] == [round(sign * 1.23456, 3), sign * -20.5, -300.0]
    assert l1["confidence"] == 0.9123
    assert l1["source_index"] == 4 and "locked" not in l1
    assert data["vertebrae"][1]["locked"] is True and "source_index" not in data["vertebrae"][1]
    assert "source_index" not in data["vertebrae"][3]

    read = formats.read_vertebrae_json(path)
    assert_same_vertebrae(read, sample_vertebrae())
    assert {v.label: v.source_index for v in read} == {"C7": 0, "T12": None, "L1": 4, "S1": None}
    assert [v.locked for v in read] == [False, True, False, False]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_writers_refuse_nan(tmp_path):
    bad = [Vertebra("L1", [0.0, np.nan, 0.0])]
    for write in (formats.write_vertebrae_json, formats.write_markups_json, formats.write_vertebrae_csv):
        with pytest.raises(VertebraIDError, match="NaN"):
            write(tmp_path / "out.json", bad)
    assert not list(tmp_path.iterdir())


@pytest.mark.realdata
def test_real_ground_truth_json_without_index_or_confidence():
    path = SHARED_DATA / "realct" / "cmbcrc_chest" / "vertebrae_gt.json"
    if not path.exists():
        pytest.skip("shared data absent")
    raw = json.loads(path.read_text())["vertebrae"]
    read = formats.read_vertebrae_json(path)
    assert [v.label for v in read][:2] == ["C7", "T1"] and len(read) == len(raw)
    np.testing.assert_allclose(read[0].position, raw[0]["position"])
    assert all(v.confidence == 1.0 for v in read)


BAD_VERTEBRAE_FILES = {
    "not_json": "this is not json",
    "no_list": json.dumps({"coordinate_system": "RAS"}),
    "unknown_label": json.dumps({"vertebrae": [{"label": "X9", "position": [0, 0, 0]}]}),
    "nan_position": '{"vertebrae": [{"label": "L1", "position": [0, NaN, 0]}]}',
    "short_position": json.dumps({"vertebrae": [{"label": "L1", "position": [0, 0]}]}),
    "text_position": json.dumps({"vertebrae": [{"label": "L1", "position": ["a", 0, 0]}]}),
    "no_position": json.dumps({"vertebrae": [{"label": "L1"}]}),
    "bad_system": json.dumps({"coordinate_system": "XYZ", "vertebrae": []}),
    "duplicate": json.dumps({"vertebrae": [{"label": "L1", "position": [0, 0, 0]}] * 2}),
    "negative_confidence": json.dumps({"vertebrae": [{"label": "L1", "position": [0, 0, 0], "confidence": -1}]}),
}


@pytest.mark.parametrize("name", sorted(BAD_VERTEBRAE_FILES))
def test_malformed_vertebrae_json_gives_one_sentence_naming_the_file(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(BAD_VERTEBRAE_FILES[name])
    with pytest.raises(VertebraIDError) as info:
        formats.read_vertebrae_json(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and message.endswith(".")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(VertebraIDError, match="no such file"):
        formats.read_vertebrae_json(tmp_path / "absent.json")
    with pytest.raises(VertebraIDError, match="folder"):
        formats.read_vertebrae_any(tmp_path)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(VertebraIDError, match="not a text file"):
        formats.read_vertebrae_any(binary)


# --------------------------------------------------------------------------- VerSe centroids


@pytest.fixture(scope="module")
def verse_mask() -> Volume:
    if not VERSE_MASK.exists():
        pytest.skip("shared data absent")
    return read_nifti(VERSE_MASK)


def test_verse_ctd_matches_the_segmentation_mask(verse_mask):
    """Each VerSe centroid (the vertebral body centre) lies inside its own vertebra's mask, about
    1 cm anterior to the mask's centre of mass (which includes the posterior arch), with small
    left-right and cranio-caudal differences: the axis codes and voxel mapping are right."""
    from scipy import ndimage

    vertebrae = formats.read_verse_ctd(VERSE_CTD, verse_mask)
    raw = json.loads(VERSE_CTD.read_text())
    assert [v.label for v in vertebrae] == ["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    assert len(vertebrae) == len(raw) - 1
    for v in vertebrae:
        verse_id = formats.VERSE_IDS[v.label]
        ijk = np.round(verse_mask.world_to_voxel(v.position)).astype(int)
        assert verse_mask.array[tuple(ijk)] == verse_id
        com_ijk = ndimage.center_of_mass(verse_mask.array == verse_id)
        offset = v.position - verse_mask.voxel_to_world(np.array(com_ijk))
        assert abs(offset[0]) < 3.0, (v.label, offset)  # left-right
        assert 5.0 < offset[1] < 16.0, (v.label, offset)  # anterior (RAS +y)
        assert abs(offset[2]) < 5.0, (v.label, offset)  # cranio-caudal


def test_verse_ctd_with_a_reoriented_reference_and_write_round_trip(tmp_path, verse_mask):
    import nibabel as nib

    native = formats.read_verse_ctd(VERSE_CTD, verse_mask)
    # Same grid stored in RAS axis order: the file's PIR voxel coordinates must land on the same points.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(verse_mask.array, verse_mask.affine))
    ras_reference = Volume(np.asarray(canonical.dataobj), canonical.affine)
    reoriented = formats.read_verse_ctd(VERSE_CTD, ras_reference)
    assert_same_vertebrae(reoriented, native, atol=1e-6)

    out = tmp_path / "out_ctd.json"
    formats.write_verse_ctd(out, native, ras_reference)
    written = json.loads(out.read_text())
    assert written[0] == {"direction": ["R", "A", "S"]}
    assert_same_vertebrae(formats.read_verse_ctd(out, verse_mask), native, atol=0.01)

    # Written in the native grid, the voxel coordinates are those of VerSe's file.
    formats.write_verse_ctd(out, native, verse_mask)
    original = json.loads(VERSE_CTD.read_text())
    again = json.loads(out.read_text())
    assert again[0]["direction"] == original[0]["direction"]
    for a, b in zip(original[1:], again[1:]):
        assert a["label"] == b["label"]
        np.testing.assert_allclose([b["X"], b["Y"], b["Z"]], [a["X"], a["Y"], a["Z"]], atol=0.01)


def test_verse_ids_sacrum_nan_coccyx_and_s2(tmp_path):
    reference = Volume(np.zeros((10, 10, 10), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    path = tmp_path / "x_ctd.json"
    path.write_text(
        '[{"direction": ["R", "A", "S"]}, {"label": 26, "X": 1, "Y": 2, "Z": 3},'
        ' {"label": 25, "X": 1, "Y": 2, "Z": 5}, {"label": 27, "X": 1, "Y": 2, "Z": 1},'
        ' {"label": 20, "X": NaN, "Y": NaN, "Z": NaN}, {"label": 28, "X": 1, "Y": 2, "Z": 9}]'
    )
    read = formats.read_verse_ctd(path, reference)
    assert [v.label for v in read] == ["T13", "L6", "S1"]
    np.testing.assert_allclose(read[-1].position, [2, 4, 6])

    out = tmp_path / "y_ctd.json"
    formats.write_verse_ctd(out, read + [Vertebra("S2", [2, 4, 0])], reference)
    assert [e.get("label") for e in json.loads(out.read_text())] == [None, 28, 25, 26]


def test_verse_ctd_errors(tmp_path):
    reference = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    cases = {
        "no_direction": ('[{"label": 20, "X": 1, "Y": 2, "Z": 3}]', None, "no 'direction'"),
        "no_reference": ('[{"direction": ["P","I","R"]}, {"label": 20, "X": 1, "Y": 2, "Z": 3}]', None, "reference"),
        "bad_id": ('[{"direction": ["P","I","R"]}, {"label": 45, "X": 1, "Y": 2, "Z": 3}]', reference, "45"),
        "bad_codes": ('[{"direction": ["P","I","A"]}, {"label": 20, "X": 1, "Y": 2, "Z": 3}]', reference, "axis codes"),
        "no_z": ('[{"direction": ["P","I","R"]}, {"label": 20, "X": 1, "Y": 2}]', reference, "'Z'"),
        "not_list": ('{"direction": ["P","I","R"]}', reference, "list"),
    }
    for name, (text, ref, fragment) in cases.items():
        path = tmp_path / f"{name}_ctd.json"
        path.write_text(text)
        with pytest.raises(VertebraIDError, match=fragment) as info:
            formats.read_verse_ctd(path, ref)
        assert str(path) in str(info.value)
    # Without "direction" the reference's own axes are used.
    path = tmp_path / "plain_ctd.json"
    path.write_text('[{"label": 20, "X": 1, "Y": 2, "Z": 3}]')
    np.testing.assert_allclose(formats.read_verse_ctd(path, reference)[0].position, [1, 2, 3])


# --------------------------------------------------------------------------- markups


@pytest.fixture(scope="module")
def markups_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = SPECS / "markups-schema-v1.0.3.json"
    if not schema_path.exists():
        pytest.skip("markups schema absent")
    schema = json.loads(schema_path.read_text())
    return jsonschema.Draft7Validator(schema)


def test_markups_point_list_is_valid_and_round_trips(tmp_path, markups_validator):
    path = tmp_path / "case.mrk.json"
    formats.write_markups_json(path, sample_vertebrae(), name="Spine")
    data = json.loads(path.read_text())
    markups_validator.validate(data)
    markup = data["markups"][0]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS" and markup["name"] == "Spine"
    points = markup["controlPoints"]
    assert [p["label"] for p in points] == ["C7", "T12", "L1", "S1"]
    assert points[2]["position"] == [-1.235, 20.5, -300.0]  # LPS
    assert points[1]["locked"] is True and points[0]["locked"] is False
    assert "0.91" in points[2]["description"]

    read = formats.read_markups_json(path)
    assert_same_vertebrae(read, sample_vertebrae(), check_confidence=False)
    assert [round(v.confidence, 2) for v in read] == [1.0, 0.5, 0.91, 0.75]
    assert [v.locked for v in read] == [False, True, False, False]


def test_markups_single_region_colour(markups_validator):
    data = formats.markups_point_list_dict([Vertebra("L2", [0, 0, 0]), Vertebra("L3", [0, 0, -30])])
    markups_validator.validate(data)
    assert tuple(data["markups"][0]["display"]["selectedColor"]) == REGION_COLORS["L"]


def test_labels_to_check_are_drawn_apart_and_read_back(tmp_path, markups_validator):
    vertebrae = [Vertebra("L1", [0, 0, 30], 0.3), Vertebra("L2", [0, 0, 0], 0.9),
                 Vertebra("L3", [0, 0, -30], 0.1, locked=True)]
    data = formats.markups_point_list_dict(vertebrae)
    markups_validator.validate(data)
    points = data["markups"][0]["controlPoints"]
    assert [p["selected"] for p in points] == [False, True, True]  # a user's fixed point is never one to check
    assert points[0]["description"] == "confidence 0.30 (check)" and points[1]["description"] == "confidence 0.90"
    display = data["markups"][0]["display"]
    assert tuple(display["color"]) == CHECK_COLOR and tuple(display["selectedColor"]) == REGION_COLORS["L"]
    formats.write_markups_json(tmp_path / "p.mrk.json", vertebrae)
    assert [v.confidence for v in formats.read_markups_json(tmp_path / "p.mrk.json")] == [0.3, 0.9, 0.1]


def test_curve_markups_valid(tmp_path, markups_validator):
    points = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 9.0]])
    path = tmp_path / "centerline.mrk.json"
    formats.write_curve_markups_json(path, points)
    data = json.loads(path.read_text())
    markups_validator.validate(data)
    markup = data["markups"][0]
    assert markup["type"] == "Curve"
    np.testing.assert_allclose([p["position"] for p in markup["controlPoints"]], points * [-1, -1, 1])
    with pytest.raises(VertebraIDError):
        formats.write_curve_markups_json(path, np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(VertebraIDError):
        formats.write_curve_markups_json(path, np.zeros((3, 2)))


def test_markups_read_by_slicer(tmp_path):
    """Slicer's own markups reader accepts the files: labels, RAS positions and locks survive."""
    slicer = pytest.importorskip("slicer")
    path = tmp_path / "case.mrk.json"
    formats.write_markups_json(path, sample_vertebrae())
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    expected = {v.label: v for v in sample_vertebrae()}
    assert node.GetNumberOfControlPoints() == len(expected)
    for i in range(node.GetNumberOfControlPoints()):
        label = node.GetNthControlPointLabel(i)
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, position)
        np.testing.assert_allclose(position, expected[label].position, atol=1e-3)
        assert bool(node.GetNthControlPointLocked(i)) == expected[label].locked


@pytest.mark.realdata
def test_markups_ras_input_undefined_points_and_errors(tmp_path):
    doc = {
        "@schema": formats.MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "RAS",
                "controlPoints": [
                    {"label": "T4", "position": [1.0, 2.0, 3.0]},
                    {"label": "T5", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"},
                ],
            }
        ],
    }
    path = tmp_path / "ras.mrk.json"
    path.write_text(json.dumps(doc))
    read = formats.read_markups_json(path)
    assert [v.label for v in read] == ["T4"]
    np.testing.assert_allclose(read[0].position, [1, 2, 3])

    doc["markups"][0]["controlPoints"][0]["label"] = "F-1"
    path.write_text(json.dumps(doc))
    with pytest.raises(VertebraIDError, match="F-1"):
        formats.read_markups_json(path)
    path.write_text(json.dumps({"@schema": formats.MARKUPS_SCHEMA}))
    with pytest.raises(VertebraIDError, match="markups"):
        formats.read_markups_json(path)


# --------------------------------------------------------------------------- CSV


def test_csv_round_trip_and_errors(tmp_path):
    path = tmp_path / "case.csv"
    formats.write_vertebrae_csv(path, sample_vertebrae())
    lines = path.read_text().splitlines()
    assert lines[0] == "label,index,x,y,z,confidence"
    assert lines[1].startswith("C7,7,")
    assert_same_vertebrae(formats.read_vertebrae_csv(path), sample_vertebrae())

    path.write_text("label,x,y\nL1,1,2\n")
    with pytest.raises(VertebraIDError, match="columns"):
        formats.read_vertebrae_csv(path)
    path.write_text("label,x,y,z\nL1,1,two,3\n")
    with pytest.raises(VertebraIDError, match="line 2"):
        formats.read_vertebrae_csv(path)
    path.write_text("label,x,y,z\nL1,1,nan,3\n")
    with pytest.raises(VertebraIDError, match="NaN"):
        formats.read_vertebrae_csv(path)


# --------------------------------------------------------------------------- points input


def test_points_json(tmp_path):
    path = tmp_path / "points.json"
    path.write_text(
        json.dumps(
            {
                "coordinate_system": "LPS",
                "points": [
                    {"position": [1, 2, 3], "probabilities": {"C": 0.02, "T": 0.01, "L": 0.99}},
                    {"position": [4, 5, 6]},
                    {"position": [7, 8, 9], "probabilities": {"L3": 0.7, "L4": 0.3}},
                ],
            }
        )
    )
    positions, probabilities, system = formats.read_points_json(path)
    assert system == "LPS"
    np.testing.assert_allclose(positions, [[-1, -2, 3], [-4, -5, 6], [-7, -8, 9]])
    assert probabilities == [{"C": 0.02, "T": 0.01, "L": 0.99}, None, {"L3": 0.7, "L4": 0.3}]

    bad = {
        "negative": {"points": [{"position": [0, 0, 0], "probabilities": {"L": -0.1}}]},
        "unknown key": {"points": [{"position": [0, 0, 0], "probabilities": {"lumbar": 1}}]},
        "not a number": {"points": [{"position": [0, 0, 0], "probabilities": {"L": "high"}}]},
        "no position": {"points": [{"probabilities": {"L": 1}}]},
        "no points": {"coordinate_system": "RAS"},
    }
    for name, content in bad.items():
        path.write_text(json.dumps(content))
        with pytest.raises(VertebraIDError) as info:
            formats.read_points_json(path)
        assert str(path) in str(info.value), name
    path.write_text('{"points": [{"position": [0, 0, 0], "probabilities": {"L": NaN}}]}')
    with pytest.raises(VertebraIDError, match="finite"):
        formats.read_points_json(path)


# --------------------------------------------------------------------------- VID dataset


@pytest.mark.parametrize("case", VID_CASES[:2])
def test_vid_real_files(case):
    pred_path, gt_path = VID_DIR / "pred" / f"{case}.json", VID_DIR / "gt" / f"{case}.json"
    if not pred_path.exists():
        pytest.skip("shared data absent")
    raw = [k for k in json.loads(pred_path.read_text()) if k["type"]["keypoint_type"] == "body"]
    positions, probabilities = formats.read_vid_detections(pred_path)
    assert positions.shape == (len(raw), 3) and len(probabilities) == len(raw)
    lps = np.array([k["coordinates"]["world_space"] for k in raw])
    np.testing.assert_allclose(positions, lps * [-1, -1, 1])
    assert probabilities[0] == dict(zip("CTL", raw[0]["type"]["spine_segment_probabilities"]))
    # The raw argmax agrees with the file's own predicted segment.
    assert [max(p, key=p.get) for p in probabilities] == [k["type"]["spine_segment"] for k in raw]

    left, _ = formats.read_vid_detections(pred_path, keypoint_type="left")
    assert len(left) == sum(k["type"]["keypoint_type"] == "left" for k in json.loads(pred_path.read_text()))

    gt = formats.read_vid_ground_truth(gt_path)
    raw_gt = [k for k in json.loads(gt_path.read_text()) if k["type"]["keypoint_type"] == "body"]
    assert sorted(v.label for v in gt) == sorted(k["type"]["spine_level"] for k in raw_gt)
    # Detections and ground truth are in the same frame: most GT bodies have a detection nearby.
    nearest = np.linalg.norm(np.array([v.position for v in gt])[:, None] - positions[None], axis=2).min(1)
    assert np.median(nearest) < 5.0
    assert formats.sniff_format(gt_path) == "vid"
    assert [v.label for v in formats.read_vertebrae_any(gt_path)] == [v.label for v in gt]


def test_vid_errors(tmp_path):
    gt_path = VID_DIR / "gt" / f"{VID_CASES[0]}.json"
    pred_path = VID_DIR / "pred" / f"{VID_CASES[0]}.json"
    if not gt_path.exists():
        pytest.skip("shared data absent")
    with pytest.raises(VertebraIDError, match="body"):
        formats.read_vid_ground_truth(gt_path, keypoint_type="left")
    with pytest.raises(VertebraIDError, match="keypoint type"):
        formats.read_vid_detections(pred_path, keypoint_type="spinous")
    with pytest.raises(VertebraIDError, match="without spine levels"):
        formats.read_vertebrae_any(pred_path)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([{"coordinates": {}, "type": {"keypoint_type": "body"}}]))
    with pytest.raises(VertebraIDError, match="world_space"):
        formats.read_vid_detections(path)


# --------------------------------------------------------------------------- sniffing


def test_read_vertebrae_any_recognises_each_format(tmp_path, verse_mask):
    vertebrae = sample_vertebrae()
    formats.write_vertebrae_json(tmp_path / "a.vertebrae.json", vertebrae, coordinate_system="LPS")
    formats.write_markups_json(tmp_path / "a.mrk.json", vertebrae)
    formats.write_vertebrae_csv(tmp_path / "a.csv", vertebrae)
    for name, kind in (("a.vertebrae.json", "vertebrae"), ("a.mrk.json", "markups"), ("a.csv", "csv")):
        assert formats.sniff_format(tmp_path / name) == kind
        assert_same_vertebrae(formats.read_vertebrae_any(tmp_path / name), vertebrae, check_confidence=False)

    verse = formats.read_vertebrae_any(VERSE_CTD, reference=verse_mask)
    assert_same_vertebrae(verse, formats.read_verse_ctd(VERSE_CTD, verse_mask))
    with pytest.raises(VertebraIDError, match="reference"):
        formats.read_vertebrae_any(VERSE_CTD)

    points = tmp_path / "points.json"
    points.write_text(json.dumps({"points": [{"position": [0, 0, 0]}]}))
    with pytest.raises(VertebraIDError, match="unlabelled points"):
        formats.read_vertebrae_any(points)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(VertebraIDError, match="not a vertebrae"):
        formats.read_vertebrae_any(other)
    text = tmp_path / "notes.txt"
    text.write_text("just some words\n")
    with pytest.raises(VertebraIDError, match="neither JSON nor CSV"):
        formats.read_vertebrae_any(text)
