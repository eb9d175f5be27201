"""Image files -> `Volume` (RAS affine) and back: NIfTI, NRRD/MetaImage and DICOM series.

Every face of VertebraID (command line, Slicer batch, training, benches) reads images here, so
that a scan reads the same everywhere and bad files get the same one-sentence error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.volume import LPS_TO_RAS, Volume
from ..errors import VertebraIDError
from .files import PathLike, atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: Every image file suffix VertebraID reads (a DICOM series is a folder).
IMAGE_SUFFIXES = (".nii.gz", ".nii") + ITK_SUFFIXES


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: PathLike, dtype=np.float32) -> Volume:
    """Read a 3-D or 4-D NIfTI (scaling applied) into a Volume."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise VertebraIDError(f"Cannot read '{path}': no such file.")
    try:
        img = _load_quietly(nib, path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VertebraIDError(f"'{path}' is not a NIfTI image.")
        _check_stored_voxel_size(path, type(img.header))
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


def _load_quietly(nib, path: Path):
    """nib.load without nibabel logging its header fixes: `_check_stored_voxel_size` judges them."""
    logger = nib.imageglobals.logger
    was_disabled, logger.disabled = logger.disabled, True
    try:
        return nib.load(str(path))
    finally:
        logger.disabled = was_disabled


def _check_stored_voxel_size(path: Path, header_class) -> None:
    """Refuse a voxel size of 0 (nibabel would warn and silently use 1 mm instead)."""
    import nibabel as nib

    with nib.openers.ImageOpener(str(path)) as fobj:
        raw = header_class.from_fileobj(fobj, check=False)  # as stored, before nibabel's fixes
    if int(raw["sform_code"]) > 0:
        sizes = np.linalg.norm(raw.get_sform()[:3, :3], axis=0)
    else:
        sizes = np.asarray(raw["pixdim"][1:4], float)
    if not np.all(np.isfinite(sizes)) or np.any(np.abs(sizes) < 1e-6):
        raise VertebraIDError(f"'{path}' stores a voxel size of 0 mm (or none) along an axis; fix its header "
                              "(pixdim or sform) to the scan's real voxel size.")


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


def read_dicom_series(folder: PathLike, dtype=np.float32) -> Volume:
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


def read_image(path: PathLike, dtype=np.float32) -> Volume:
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


def write_nifti(volume: Volume, path: PathLike, dtype=None) -> None:
    """Write a Volume as NIfTI, atomically. Integer dtypes are written as is (no scaling)."""
    import nibabel as nib

    array = volume.array if dtype is None else volume.array.astype(dtype)
    img = nib.Nifti1Image(array, volume.affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_scaled_uint8_nifti(volume: Volume, path: PathLike) -> None:
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


def read_geometry(path: Path) -> Volume:
    """The grid of an image without its voxels (a zero-strided array of the right shape)."""
    if path.is_file():
        lower = path.name.lower()
        try:
            if lower.endswith((".nii", ".nii.gz")):
                import nibabel as nib

                header_image = nib.load(str(path))
                if len(header_image.shape) >= 3:
                    return Volume(np.broadcast_to(np.float32(0), header_image.shape[:3]), header_image.affine)
            elif lower.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
                import SimpleITK as sitk

                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
                if reader.GetDimension() == 3:
                    lps = np.eye(4)
                    lps[:3, :3] = np.array(reader.GetDirection()).reshape(3, 3) * np.array(reader.GetSpacing())
                    lps[:3, 3] = reader.GetOrigin()
                    return Volume(np.broadcast_to(np.float32(0), tuple(reader.GetSize())), LPS_TO_RAS @ lps)
        except Exception as exc:  # header readers raise many types for corrupt files
            raise VertebraIDError(f"'{path}' is not a readable image ({type(exc).__name__}).") from exc
    return read_image(path)  # DICOM folders and anything unusual: the full reader judges


def reorient_arrays(arrays: dict, affine: np.ndarray, axcodes: str):
    """Transpose/flip arrays (sharing one grid) to `axcodes`; adjust the affine."""
    import nibabel.orientations as nio

    current = nio.io_orientation(affine)
    target = nio.axcodes2ornt(tuple(axcodes))
    transform = nio.ornt_transform(current, target)
    shape = next(iter(arrays.values())).shape
    new_affine = affine @ nio.inv_ornt_aff(transform, shape)
    out = {k: np.ascontiguousarray(nio.apply_orientation(v, transform)) for k, v in arrays.items()}
    return out, new_affine
