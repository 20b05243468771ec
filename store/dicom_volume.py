"""DICOM export of a chest-CT volume: a CT Image Storage series (one file per slice, int16 HU) and a DICOM SEG
(highdicom, BINARY, one segment per class present) referencing it.

Geometry is DICOM's patient LPS: ImageOrientationPatient [1,0,0, 0,1,0] (rows run to the patient's left,
columns posterior), ImagePositionPatient of slice k from the volume's LPS affine, which is the NIfTI RAS
affine with x and y negated. UIDs derive from a caller-given key (deterministic, no clock). Segment labels are
the pairforge class names; the tracking id of each segment is ``class:<id>`` so label ids survive the trip.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

SOFTWARE = "pairforge"


def _uid(key: str, *parts: Any) -> str:
    return generate_uid(entropy_srcs=[key, *map(str, parts)])


def ct_series_datasets(image_kji: np.ndarray, lps_affine: np.ndarray, key: str,
                       patient_id: str = "PAIRFORGE-SYNTH") -> list[Dataset]:
    """One CT dataset per slice (in memory)."""
    nz, ny, nx = image_kji.shape
    study, series, frame = _uid(key, "study"), _uid(key, "ct-series"), _uid(key, "frame")
    col_sp, row_sp = float(lps_affine[0, 0]), float(lps_affine[1, 1])
    dz = float(abs(lps_affine[2, 2]))
    out = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = _uid(key, "ct", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "Synthetic^Phantom", patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = "20260101", "000000", "20260101", "000000"
        ds.ContentDate, ds.ContentTime = "20260101", "000000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "", "1", ""
        ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = SOFTWARE, "procedural_volume", "1.0"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SeriesDescription = "pairforge synthetic chest CT"
        ds.BurnedInAnnotation = "NO"
        ds.PositionReferenceIndicator = ""
        ijk = np.array([0.0, 0.0, float(k), 1.0])
        pos = lps_affine @ ijk
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos[:3]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [round(row_sp, 6), round(col_sp, 6)]
        ds.SliceThickness = round(dz, 6)
        ds.SpacingBetweenSlices = round(dz, 6)
        ds.SliceLocation = round(float(pos[2]), 4)
        ds.KVP = "120"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = np.ascontiguousarray(image_kji[k], dtype=np.int16).tobytes()
        out.append(ds)
    return out


def write_dicom(image_kji: np.ndarray, label_kji: np.ndarray, lps_affine: np.ndarray, class_names: dict[int, str],
                out_dir: Path, key: str) -> dict[str, Any]:
    """Write ``out_dir/ct/CT_XXXX.dcm`` and ``out_dir/seg.dcm``. Returns paths and the segment -> class map."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out_dir = Path(out_dir)
    (out_dir / "ct").mkdir(parents=True, exist_ok=True)
    cts = ct_series_datasets(image_kji, lps_affine, key)
    paths = []
    for ds in cts:
        p = out_dir / "ct" / f"CT_{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    present = [int(c) for c in np.unique(label_kji) if c != 0]
    seg_map = {i + 1: c for i, c in enumerate(present)}
    lut = np.zeros(256, np.uint8)
    for s, c in seg_map.items():
        lut[c] = s
    descs = [hd.seg.SegmentDescription(
        segment_number=s, segment_label=class_names[c][:64], segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        tracking_uid=_uid(key, "track", c), tracking_id=f"class:{c}") for s, c in seg_map.items()]
    seg = hd.seg.Segmentation(
        source_images=cts, pixel_array=lut[label_kji], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=_uid(key, "seg-series"), series_number=2,
        sop_instance_uid=_uid(key, "seg"), instance_number=1, manufacturer=SOFTWARE,
        manufacturer_model_name="procedural_volume", software_versions="1.0", device_serial_number="0",
        content_label="PAIRFORGE", content_description="pairforge class labels")
    seg_path = out_dir / "seg.dcm"
    seg.save_as(seg_path)
    return {"ct": [str(p) for p in paths], "seg": str(seg_path), "segments": seg_map}


def read_seg_labels(seg_path: Path, ct_paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(label volume [k, j, i] with pairforge class ids, LPS positions of the CT slices it references)."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    cts = sorted((pydicom.dcmread(p) for p in ct_paths), key=lambda d: int(d.InstanceNumber))
    to_class = {}
    for s in seg.segment_numbers:
        tid = seg.get_segment_description(s).tracking_id
        to_class[s] = int(tid.split(":")[1])
    uids = [d.SOPInstanceUID for d in cts]
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True, relabel=False)
    lut = np.zeros(max(to_class) + 1 if to_class else 1, np.uint8)
    for s, c in to_class.items():
        lut[s] = c
    pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in cts])
    return lut[arr], pos


# ---------------------------------------------------------------- `pairforge export dicom`
from store.export import register_exporter, selected, staged_folder  # noqa: E402

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@register_exporter("dicom", summary="DICOM per volume: DEST/<name>/<sample_id>/ct/CT_XXXX.dcm (CT Image Storage "
                   "series, int16 HU) and seg.dcm (DICOM SEG, one segment per class, tracking id class:<id>)")
def export_version_dicom(version: Any, dest: Path, *, split=None, classes=None, overwrite: bool = False) -> dict[str, Any]:
    """A published volume version as DICOM CT series + SEG, read through the sha-verified reader. UIDs derive
    from ``name@vN/sample_id`` (the same version exports to the same UIDs). 2D versions are refused."""
    from schemas.errors import SpecError
    from store.codecs import codec_for_row

    indices = selected(version, split, classes)
    flat = [i for i in indices if codec_for_row(version.row(i)).spatial_dims != 3]
    if flat:
        raise SpecError(f"{version.ref} holds 2D images (codec {version.row(flat[0])['image_codec']['name']}); "
                        "the dicom format exports volumes only (e.g. domain chest_ct_volume)")
    names = {int(k): str(v) for k, v in version.manifest.class_table.items()}
    final = Path(dest) / version.name
    out_files = segments = 0
    with staged_folder(final, overwrite=overwrite) as out:
        for i in indices:
            d = version[i]
            lps = RAS_TO_LPS @ np.asarray(d["affine"], float)
            res = write_dicom(d["image"], np.asarray(d["label"], np.uint8), lps, names, out / d["sample_id"],
                              key=f"{version.ref}/{d['sample_id']}")
            out_files += len(res["ct"]) + 1
            segments += len(res["segments"])
    return {"path": str(final), "counts": {"volumes": len(indices), "files": out_files, "segments": segments}}
