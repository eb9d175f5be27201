"""The one image reader every face shares: bad headers are one sentence, not a silent guess."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from VertebraIDLib.cli import main
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.io.images import read_image


def _nifti_with_voxel_size(path, sizes, sform: bool):
    image = nib.Nifti1Image(np.zeros((8, 8, 8, 26), np.float32), None)
    image.header["pixdim"][1:4] = sizes
    if sform:
        image.header.set_sform(np.diag([*sizes, 1.0]), code=1)
    image.header["qform_code"] = 0
    nib.save(image, str(path))
    return path


@pytest.mark.parametrize("sform", [False, True])
def test_a_voxel_size_of_zero_is_refused_in_one_sentence(tmp_path, capsys, sform):
    path = _nifti_with_voxel_size(tmp_path / "maps.nii.gz", [2.0, 0.0, 2.0], sform)
    with pytest.raises(VertebraIDError, match="voxel size of 0 mm"):
        read_image(path)
    assert main(["locate", str(path), "-o", str(tmp_path / "out.json")]) == 2
    captured = capsys.readouterr()
    assert "voxel size of 0 mm" in captured.err and "Traceback" not in captured.err
    assert "setting 0 dims to 1" not in captured.out + captured.err  # nibabel's own warning is not shown
    assert not (tmp_path / "out.json").exists()


def test_a_sound_header_reads_with_its_voxel_size(tmp_path):
    path = _nifti_with_voxel_size(tmp_path / "maps.nii.gz", [2.0, 3.0, 4.0], False)
    np.testing.assert_allclose(read_image(path).spacing, [2.0, 3.0, 4.0])
