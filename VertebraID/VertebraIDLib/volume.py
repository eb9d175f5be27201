"""Images as a numpy array plus the affine that maps voxel indices to RAS millimetres.

Every reader returns a `Volume` whose array axes are the voxel axes (i, j, k[, channel]) and
whose `affine` maps (i, j, k, 1) to RAS (Slicer's world). Orientation is never assumed from
axis order: code that needs "superior" asks the affine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import VertebraIDError
from .fileio import atomic_path

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3-D (or 4-D, channels last) image with its voxel-to-RAS affine."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=float)
        if self.affine.shape != (4, 4):
            raise VertebraIDError("An image affine must be a 4x4 matrix.")
        if self.array.ndim not in (3, 4):
            raise VertebraIDError(f"Expected a 3-D or 4-D image, got {self.array.ndim} dimensions.")

    @property
    def shape3(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[:3])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def num_channels(self) -> int:
        return 1 if self.array.ndim == 3 else self.array.shape[3]

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, ras: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        ras = np.asarray(ras, dtype=float)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def axis_most_along(self, direction) -> tuple[int, float]:
        """The voxel axis closest to a RAS direction, and the sign of its alignment."""
        cols = self.affine[:3, :3] / self.spacing
        dots = cols.T @ np.asarray(direction, dtype=float)
        axis = int(np.argmax(np.abs(dots)))
        return axis, float(np.sign(dots[axis]))

    def channel(self, c: int) -> "Volume":
        return Volume(self.array[..., c], self.affine)

    def corners_world(self) -> np.ndarray:
        """RAS coordinates of the 8 corner voxel centres."""
        n = np.array(self.shape3) - 1
        corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], float)
        return self.voxel_to_world(corners)


def check_finite(array: np.ndarray, what: str = "The image") -> None:
    if not np.isfinite(array).all():
        raise VertebraIDError(f"{what} contains NaN or infinite values.")


# --------------------------------------------------------------------------- reading

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike, dtype=np.float32) -> Volume:
    """Read a 3-D or 4-D NIfTI (scaling applied) into a Volume."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise VertebraIDError(f"Cannot read '{path}': no such file.")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VertebraIDError(f"'{path}' is not a NIfTI image.")
        array = np.asarray(img.dataobj, dtype=dtype)
        affine = img.affine
    except VertebraIDError:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise VertebraIDError(f"'{path}' is not a readable NIfTI image ({type(exc).__name__}).") from exc
    while array.ndim > 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI stores vectors as 5-D (x, y, z, 1, c)
        array = array[:, :, :, 0, :]
    return Volume(array, affine)


def _sitk_to_volume(image, dtype=np.float32) -> Volume:
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise VertebraIDError(f"Expected a 3-D image, got {image.GetDimension()} dimensions.")
    array = sitk.GetArrayFromImage(image).astype(dtype, copy=False)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.transpose(array, (2, 1, 0, 3))
    else:
        array = np.transpose(array, (2, 1, 0))
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing(), float)
    lps[:3, 3] = image.GetOrigin()
    return Volume(np.ascontiguousarray(array), LPS_TO_RAS @ lps)


def read_dicom_series(folder: str | os.PathLike, dtype=np.float32) -> Volume:
    """Read the largest DICOM series in a folder, keeping only slices parallel to the majority.

    Reformatted series often carry a localiser or reference slice in another plane; such
    slices are dropped so that the volume's geometry is consistent.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VertebraIDError(f"No DICOM series found in '{folder}'.")
    files = max((reader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
    files = _slices_in_majority_plane(files)
    if len(files) < 2:
        raise VertebraIDError(f"The DICOM series in '{folder}' has fewer than 2 slices; a 3-D scan is needed.")
    reader.SetFileNames(list(files))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VertebraIDError(f"Cannot read the DICOM series in '{folder}'.") from exc
    return _sitk_to_volume(image, dtype)


def _slices_in_majority_plane(files):
    import SimpleITK as sitk

    normals = []
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        try:
            r.ReadImageInformation()
            iop = [float(v) for v in r.GetMetaData("0020|0037").split("\\")]
            normals.append(np.round(np.cross(iop[:3], iop[3:]), 3))
        except RuntimeError:
            normals.append(None)
    keys = [tuple(np.abs(n)) if n is not None else None for n in normals]
    valid = [k for k in keys if k is not None]
    if not valid:
        return list(files)
    majority = max(set(valid), key=valid.count)
    return [f for f, k in zip(files, keys) if k == majority]


def read_image(path: str | os.PathLike, dtype=np.float32) -> Volume:
    """Read NIfTI, NRRD/MetaImage, or a DICOM series folder into a Volume (RAS affine)."""
    path = Path(path)
    if not path.exists():
        raise VertebraIDError(f"Cannot read '{path}': no such file or folder.")
    if path.is_dir():
        return read_dicom_series(path, dtype)
    if _is_nifti(path):
        return read_nifti(path, dtype)
    if path.name.lower().endswith(ITK_SUFFIXES):
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise VertebraIDError(f"'{path}' is not a readable image.") from exc
        return _sitk_to_volume(image, dtype)
    raise VertebraIDError(
        f"'{path}' is not a supported image (NIfTI .nii/.nii.gz, NRRD, MetaImage or a DICOM folder)."
    )


# --------------------------------------------------------------------------- writing


def write_nifti(volume: Volume, path: str | os.PathLike, dtype=None) -> None:
    """Write a Volume as NIfTI, atomically. Integer dtypes are written as is (no scaling)."""
    import nibabel as nib

    array = volume.array if dtype is None else volume.array.astype(dtype)
    img = nib.Nifti1Image(array, volume.affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_scaled_uint8_nifti(volume: Volume, path: str | os.PathLike) -> None:
    """Write non-negative maps compactly as uint8 with a NIfTI scale factor."""
    import nibabel as nib

    array = np.clip(volume.array, 0, None).astype(np.float32)
    peak = float(array.max()) or 1.0
    slope = peak / 255.0
    img = nib.Nifti1Image(np.round(array / slope).astype(np.uint8), volume.affine)
    img.header.set_slope_inter(slope, 0.0)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def resample_to_spacing(volume: Volume, spacing_mm: float, order: int = 1) -> Volume:
    """Resample onto an axis-aligned RAS grid of isotropic spacing covering the same extent."""
    from scipy.ndimage import map_coordinates

    corners = volume.corners_world()
    lo, hi = corners.min(0), corners.max(0)
    shape = np.maximum(np.floor((hi - lo) / spacing_mm).astype(int) + 1, 1)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3) * spacing_mm
    affine[:3, 3] = lo
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    src = volume.world_to_voxel(grid * spacing_mm + lo).T
    if volume.array.ndim == 3:
        out = map_coordinates(volume.array, src, order=order, mode="constant", cval=float(volume.array.min()))
        return Volume(out.reshape(tuple(shape)).astype(volume.array.dtype), affine)
    chans = [
        map_coordinates(volume.array[..., c], src, order=order, mode="constant", cval=0.0).reshape(tuple(shape))
        for c in range(volume.array.shape[3])
    ]
    return Volume(np.stack(chans, -1).astype(volume.array.dtype), affine)
