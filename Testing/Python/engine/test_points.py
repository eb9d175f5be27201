"""label_points with a user's fixed points (Re-label on points, skeletons)."""
import numpy as np
from VertebraIDLib.engine.corrections import Constraint
from VertebraIDLib.engine.points import label_points
from VertebraIDLib.engine.settings import EngineSettings


def _lumbar_column(n, start_z=0.0, gap=34.0):
    """n body centres 34 mm apart down a straight spine (RAS: superior is +z)."""
    return np.array([[0.0, 0.0, start_z - i * gap] for i in range(n)])


def test_fixed_points_past_the_detected_bodies_extend_the_spine():
    detected = _lumbar_column(4)  # L1..L4; the detector missed L5 and S1
    lumbar = [{"L": 1.0}] * 4
    beyond = _lumbar_column(6)[4:]
    constraints = [Constraint("L5", beyond[0]), Constraint("S1", beyond[1])]
    labelling = label_points(detected, lumbar, EngineSettings(), constraints, include_inferred=False)
    labels = {v.label: v for v in labelling.vertebrae}
    assert [v.label for v in labelling.vertebrae] == ["L1", "L2", "L3", "L4", "L5", "S1"]
    for name, position in (("L5", beyond[0]), ("S1", beyond[1])):
        assert labels[name].locked and labels[name].source_index is None
        np.testing.assert_allclose(labels[name].position, position)
    assert [labels[f"L{i + 1}"].source_index for i in range(4)] == [0, 1, 2, 3]
    assert labelling.rejected == []


def test_a_fixed_point_on_a_detected_body_takes_that_point():
    detected = _lumbar_column(5)
    constraints = [Constraint("L3", detected[2] + np.array([3.0, 0.0, 0.0]))]
    labelling = label_points(detected, [{"L": 1.0}] * 5, EngineSettings(), constraints, include_inferred=False)
    assert [v.label for v in labelling.vertebrae] == ["L1", "L2", "L3", "L4", "L5"]
    assert [v.source_index for v in labelling.vertebrae] == [0, 1, 2, 3, 4]
