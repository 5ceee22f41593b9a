"""Writers of small releases in their published layouts, for tests/test_convert.py and tests/test_prepare.py.

Each `make_<release>(root)` lays out one release under `root/<the folder its download makes>`, with file and
field names and value styles as published (looked up on the releases' cards and download scripts): SLAKE's
q_lang en/zh, VQA-RAD's trailing space in answer_type, PMC-VQA's ' A: Right Coronary Artery ' choices and
unnamed index column, MMMU's options as a list literal, parquet image structs {'bytes', 'path'}, LLaVA-Med's
data/alignment, data/instruct and data/images folders, the hub's auto-converted `default/test/0000.parquet`.
Images are small generated PNG/JPEG files, each with its own seed (no accidental duplicates across releases),
except where a test wants a leak: `leak_image` gives a real image (scikit-image's cell, histology) to copy.
"""
import gzip
import io
import itertools
import json
import os
import shutil

import numpy as np
from PIL import Image

import report_fixtures

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
_seeds = itertools.count(1000)


def image_bytes(fmt="PNG", seed=None):
    rng = np.random.default_rng(next(_seeds) if seed is None else seed)
    pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w", encoding=None if isinstance(data, bytes) else "utf-8") as f:
        f.write(data)
    return path


def image_file(path):
    return write(path, image_bytes("JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"))


def struct(fmt="PNG", path=None, data=None):
    return {"bytes": data or image_bytes(fmt), "path": path}


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def leak_image(name="cell"):
    from skimage import data as skdata
    return Image.fromarray(getattr(skdata, name)())


def encoded(image, fmt, **kw):
    out = io.BytesIO()
    image.convert("RGB" if fmt == "JPEG" else image.mode).save(out, fmt, **kw)
    return out.getvalue()


# -----------------------------------------------------------------------------

def make_slake(root):
    src = os.path.join(root, "Slake1.0")
    shutil.copytree(os.path.join(FIXTURES, "slake", "Slake1.0"), src)
    write(os.path.join(src, "imgs", "xmlab102", "source.jpg"), encoded(leak_image(), "JPEG", quality=95))
    image_file(os.path.join(src, "imgs", "xmlab7", "source.jpg"))
    image_file(os.path.join(src, "imgs", "xmlab300", "source.jpg"))
    train = [{"img_id": 300, "img_name": "xmlab300/source.jpg", "question": "Which organ is abnormal?",
              "answer": "Lung", "q_lang": "en", "location": "Chest", "modality": "CT", "answer_type": "OPEN",
              "base_type": "vqa", "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": 1},
             {"img_id": 300, "img_name": "xmlab300/source.jpg", "question": "哪个器官不正常？", "answer": "肺",
              "q_lang": "zh", "location": "Chest", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
              "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": 2},
             {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "Is this a CT image?", "answer": "Yes",
              "q_lang": "en", "location": "Abdomen", "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa",
              "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": 3}]
    write(os.path.join(src, "train.json"), json.dumps(train, ensure_ascii=False, indent=1))
    return src


def vqa_rad_rows(shared):
    return [{"image": {"bytes": shared, "path": None}, "question": "is there a fracture?", "answer": "no"},
            {"image": struct("JPEG"), "question": "is this an ap or pa film?", "answer": "pa"},
            {"image": struct("JPEG"), "question": "where is the opacity?", "answer": "right lower lobe"}]


def make_vqa_rad_parquet(root):
    """The hub's auto-converted layout (refs/convert/parquet): default/{train,test}/0000.parquet. Train and
    test share images, as in the release."""
    src = os.path.join(root, "vqa-rad")
    shared = image_bytes("JPEG")
    write_parquet(os.path.join(src, "default", "test", "0000.parquet"), vqa_rad_rows(shared))
    write_parquet(os.path.join(src, "default", "train", "0000.parquet"),
                  [{"image": {"bytes": shared, "path": None}, "question": "is the heart enlarged?", "answer": "yes"},
                   {"image": struct("JPEG"), "question": "what organ is this?", "answer": "liver"}])
    return src


def make_vqa_rad_osf(root):
    """The OSF release: `VQA_RAD Dataset Public.json` (answer_type with its trailing space) + image folder."""
    src = os.path.join(root, "osfstorage-archive")
    rows = [("synpic100.jpg", "is there a fracture?", "no", "CLOSED ", "test_freeform"),
            ("synpic101.jpg", "is this an ap or pa film?", "pa", "CLOSED", "test_para"),
            ("synpic102.jpg", "where is the opacity?", "right lower lobe", "OPEN", "test_freeform"),
            ("synpic100.jpg", "is the heart enlarged?", "yes", "CLOSED", "freeform")]
    items = [{"qid": i, "image_name": img, "image_organ": "CHEST", "answer": ans, "answer_type": atype,
              "question_type": "PRES", "question": q, "phrase_type": phrase, "qid_linked_id": str(i),
              "image_case_url": "https://medpix.nlm.nih.gov/case?id=x", "question_rephrase": "NULL",
              "question_relation": "NULL", "question_frame": "NULL", "evaluation": "given"}
             for i, (img, q, ans, atype, phrase) in enumerate(rows, 1)]
    write(os.path.join(src, "VQA_RAD Dataset Public.json"), json.dumps(items, indent=1))
    for name in ("synpic100.jpg", "synpic101.jpg", "synpic102.jpg"):
        image_file(os.path.join(src, "VQA_RAD Image Folder", name))
    return src


def make_pathvqa(root):
    src = os.path.join(root, "path-vqa")
    for split in ("train", "test"):
        write_parquet(os.path.join(src, "data", f"{split}-00000-of-00001.parquet"),
                      [{"image": struct("JPEG"), "question": "is this tissue malignant?", "answer": "yes"},
                       {"image": struct("PNG", "x.png"), "question": "what is present?", "answer": "necrosis"}])
    return src


PMC_VQA_HEADER = ",Figure_path,Caption,Question,Choice A,Choice B,Choice C,Choice D,Answer,split\n"


def make_pmc_vqa(root):
    """images_2.zip -> figures/ (test_2.csv, train_2.csv), images.zip -> images/ (test.csv, train.csv); both
    unpacked. The *_2.csv files start with an unnamed index column."""
    src = os.path.join(root, "PMC-VQA")
    write(os.path.join(src, "test_2.csv"), PMC_VQA_HEADER +
          '17,PMC8253867_Fig2_41.jpg,Coronary angiogram.,Which artery is occluded?, A: Right Coronary Artery ,'
          ' B: Left Anterior Descending , C: Circumflex , D: Left Main ,A,test\n'
          '42,PMC8253800_Fig2_1.jpg,A knee radiograph.,Which joint is shown?,A:Knee,B:Hip,C:Elbow,D:Ankle,A,test\n')
    histology = leak_image("immunohistochemistry")
    write(os.path.join(src, "figures", "PMC8253867_Fig2_41.jpg"), encoded(histology, "JPEG", quality=90))
    image_file(os.path.join(src, "figures", "PMC8253800_Fig2_1.jpg"))
    image_file(os.path.join(src, "images", "PMC1064097_F1.jpg"))  # version 1's folder holds other files
    write(os.path.join(src, "train_2.csv"), PMC_VQA_HEADER +
          '5,PMC9000001_Fig1_1.jpg,An axial CT.,What modality is shown?, A:CT , B:MRI , C:PET , D:US ,A,train\n'
          '6,PMC9000002_Fig3_2.jpg,Re-used figure.,Which artery is shown?, A:LAD , B:RCA , C:LCx , D:LM ,B,train\n')
    image_file(os.path.join(src, "figures", "PMC9000001_Fig1_1.jpg"))
    small = histology.resize((256, 256), Image.Resampling.BICUBIC)  # the test figure again, resized
    write(os.path.join(src, "figures", "PMC9000002_Fig3_2.jpg"), encoded(small, "JPEG", quality=70))
    return src


def mmmu_row(i, split, question, options, answer, n_images, subject=None):
    row = {"id": f"{split}_Clinical_Medicine_{i}", "question": question, "options": options, "explanation": "",
           "answer": answer, "img_type": "['Photos']", "topic_difficulty": "Medium"}
    if subject:
        row["subject"] = subject
    else:
        row.update({"question_type": "multiple-choice", "subfield": "x"})
    for k in range(1, 8):
        row[f"image_{k}"] = struct() if k <= n_images else None
    return row


def make_mmmu(root):
    src = os.path.join(root, "MMMU")
    write_parquet(os.path.join(src, "Clinical_Medicine", "validation-00000-of-00001.parquet"),
                  [mmmu_row(1, "validation", "What is shown in <image 1>?", "['a cyst', 'a tumour']", "B", 1)])
    return src


def make_mmmu_pro(root):
    src = os.path.join(root, "MMMU_Pro")
    four = "['Pneumonia', 'Effusion', 'Pneumothorax', 'Normal']"
    ten = "['Pneumonia', 'Effusion', 'Pneumothorax', 'Normal', 'Edema', 'Mass', 'Nodule', 'Atelectasis', " \
          "'Fracture', 'Cardiomegaly']"
    for config, options in (("standard (4 options)", four), ("standard (10 options)", ten)):
        write_parquet(os.path.join(src, config, "test-00000-of-00001.parquet"), [
            mmmu_row(1, "test", "<image 1> What is the finding?", options, "C", 1, "Clinical_Medicine"),
            mmmu_row(2, "test", "<image 1> Which style?", options, "A", 1, "Art")])
    write_parquet(os.path.join(src, "vision", "test-00000-of-00001.parquet"),
                  [{"id": "test_Clinical_Medicine_1", "image": struct(), "options": four, "answer": "C",
                    "subject": "Clinical_Medicine"}])
    return src


def make_copy(root, fixture, folder, images=()):
    src = os.path.join(root, folder)
    shutil.copytree(os.path.join(FIXTURES, fixture), src)
    for rel in images:
        image_file(os.path.join(src, rel))
    return src


def make_medxpertqa(root):
    return make_copy(root, "medxpertqa", "MedXpertQA", ["images/MM-0-a.jpeg", "images/MM-0-b.jpeg"])


def make_medframeqa(root):
    src = os.path.join(root, "MedFrameQA")
    row = {"question_id": "q1", "system": "Cardiovascular", "organ": "heart", "keyword": "k", "modality": "CT",
           "question": "Across the frames, what changes?", "options": ["size", "shape", "colour", "nothing"],
           "correct_answer": "B", "explanation": ""}
    for k in range(1, 6):
        row[f"image_{k}"] = struct("PNG", f"{k}.png") if k <= 2 else None
    write_parquet(os.path.join(src, "data", "test-00000-of-00001.parquet"), [row])
    return src


def make_medqa(root):
    src = make_copy(root, "medqa", "MedQA")
    train = {"question": "A 23-year-old woman has a fever. Which drug is best?", "answer": "Ceftriaxone",
             "options": {"A": "Ceftriaxone", "B": "Aspirin", "C": "Insulin", "D": "Heparin"},
             "meta_info": "step1", "answer_idx": "A", "metamap_phrases": ["fever"]}
    write(os.path.join(src, "data_clean", "questions", "US", "4_options", "phrases_no_exclude_train.jsonl"),
          json.dumps(train) + "\n")
    return src


def make_medmcqa(root):
    src = make_copy(root, "medmcqa", "medmcqa")
    train = {"question": "Drug of choice for malaria in pregnancy?", "exp": "Chloroquine is safe in pregnancy.",
             "cop": 2, "opa": "Primaquine", "opb": "Chloroquine", "opc": "Doxycycline", "opd": "Tetracycline",
             "subject_name": "Pharmacology", "topic_name": None, "id": "t1", "choice_type": "single"}
    write(os.path.join(src, "train.json"), json.dumps(train) + "\n")
    return src


def make_pubmedqa(root):
    return make_copy(root, "pubmedqa", "pubmedqa")


def make_medbullets(root):
    return make_copy(root, "medbullets", "ChallengeClinicalQA")


def make_report_release(folder, write):
    """A chest X-ray report release under RAW/<folder>, in the layout tests/report_fixtures.py writes."""
    def make(root):
        src = os.path.join(root, folder)
        write(src)
        return src
    return make


make_mimic_cxr = make_report_release("mimic-cxr-jpg", report_fixtures.write_mimic_cxr)  # reports beside images
make_iu_xray = make_report_release("iu-xray", report_fixtures.write_iu_xray)
make_chexpert_plus = make_report_release("chexpert-plus", report_fixtures.write_chexpert_plus)


def make_llava_med(root):
    """The official scripts' layout: data/alignment/, data/instruct/, data/images/<pair_id>.jpg."""
    src = os.path.join(root, "LLaVA-Med")
    data = os.path.join(src, "data")
    shutil.copy(os.path.join(FIXTURES, "llava_med", "llava_med_alignment_500k.json"), os.path.join(
        os.makedirs(os.path.join(data, "alignment")) or os.path.join(data, "alignment"), "llava_med_alignment_500k.json"))
    shutil.copy(os.path.join(FIXTURES, "llava_med", "llava_med_instruct_60k_inline_mention.json"), os.path.join(
        os.makedirs(os.path.join(data, "instruct")) or os.path.join(data, "instruct"),
        "llava_med_instruct_60k_inline_mention.json"))
    image_file(os.path.join(data, "images", "PMC100_F1.jpg"))
    write(os.path.join(data, "images", "PMC101_F2.jpg"), encoded(leak_image(), "PNG"))  # SLAKE's test image
    return src


def make_pmc_oa(root):
    return make_copy(root, "pmc_oa", "pmc_oa", ["images/PMC212319_Fig3_4.jpg", "images/PMC300001_F1_1.jpg"])


def make_roco(root):
    src = os.path.join(root, "roco-dataset")
    folder = os.path.join(src, "data", "train", "radiology")
    write(os.path.join(folder, "captions.txt"), "ROCO_00002\t Computed tomography scan in axial view showing "
          "obliteration of the left maxillary sinus \nROCO_00003\t Axial MRI of the brain. \n")
    for name in ("ROCO_00002", "ROCO_00003"):
        image_file(os.path.join(folder, "images", f"{name}.jpg"))
    return src


def make_rocov2(root):
    src = os.path.join(root, "ROCOv2")
    write(os.path.join(src, "train_captions.csv"), "ID,Caption\nROCOv2_2023_train_000001,Head CT demonstrating "
          "left parotiditis.\nROCOv2_2023_train_000002,\"Chest X-ray, PA view: no effusion.\"\n")
    for n in (1, 2):
        image_file(os.path.join(src, "train", f"ROCOv2_2023_train_00000{n}.jpg"))
    return src


JATS = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.2 20190208//EN" "JATS-archivearticle1.dtd">
<article xmlns:mml="http://www.w3.org/1998/Math/MathML" xmlns:xlink="http://www.w3.org/1999/xlink" article-type="case-report">
<front><journal-meta><journal-id journal-id-type="nlm-ta">Radiol Case Rep</journal-id></journal-meta>
<article-meta><article-id pub-id-type="pmcid">PMC7000001</article-id>
<title-group><article-title>Pleural effusion in a young adult: a case report</article-title></title-group>
<abstract><p>We report a pleural effusion.</p></abstract></article-meta></front>
<body><sec id="s1"><title>Case presentation</title>
<p>A 30-year-old man presented with dyspnoea. The radiograph (<xref ref-type="fig" rid="fig2">Fig. 2</xref>) showed an effusion.</p>
<p>CT confirmed it (<xref ref-type="fig" rid="fig1">Fig. 1</xref>, <xref ref-type="fig" rid="fig2">Fig. 2</xref>).</p>
<fig id="fig1" position="float"><label>Fig. 1</label><caption><p>Axial CT: right effusion.</p></caption><graphic xlink:href="gr1"/></fig>
<fig id="fig2" position="float"><label>Fig. 2</label><caption><p>Chest radiograph, PA view.</p></caption><graphic xlink:href="gr2"/></fig>
<table-wrap id="tbl1"><label>Table 1</label><caption><p>Laboratory values.</p></caption><table><tr><td>12</td></tr></table></table-wrap>
</sec><sec id="s2"><title>Discussion</title><p>Effusions are common.</p>
<fig id="fig3"><label>Fig. 3</label><caption><p>Never cited.</p></caption><graphic xlink:href="gr3"/></fig></sec></body>
<back><ref-list><ref id="bib1"><mixed-citation>A reference.</mixed-citation></ref></ref-list></back></article>
"""


def make_pmc_articles(root):
    """oa_package/xx/yy/PMC7000001.tar.gz unpacked: PMC7000001/<name>.nxml with gr1.jpg ... beside it."""
    folder = os.path.join(root, "oa_package", "PMC7000001")
    write(os.path.join(folder, "RCR-15-100.nxml"), JATS)
    for name in ("gr1.jpg", "gr2.jpg", "gr3.jpg"):
        image_file(os.path.join(folder, name))
    write(os.path.join(folder, "gr1.gif"), image_bytes("GIF"))  # PMC ships a .gif beside the .jpg
    return os.path.join(root, "oa_package")


PUBMED = """<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">
<PubmedArticleSet>
<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM"><PMID Version="1">100</PMID>
<Article PubModel="Print"><ArticleTitle>Statins after myocardial infarction.</ArticleTitle>
<Abstract><AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Statins lower LDL.</AbstractText>
<AbstractText Label="RESULTS" NlmCategory="RESULTS">Mortality fell by <i>20%</i>.</AbstractText></Abstract>
</Article></MedlineCitation><PubmedData><PublicationStatus>ppublish</PublicationStatus></PubmedData></PubmedArticle>
<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM"><PMID Version="1">101</PMID>
<Article PubModel="Print"><ArticleTitle>A letter without abstract.</ArticleTitle></Article></MedlineCitation></PubmedArticle>
<DeleteCitation><PMID Version="1">99</PMID></DeleteCitation>
</PubmedArticleSet>
"""


def make_pubmed(root):
    write(os.path.join(root, "baseline", "pubmed25n0001.xml.gz"), gzip.compress(PUBMED.encode()))
    return os.path.join(root, "baseline")


def make_text(root):
    write(os.path.join(root, "guidelines", "sepsis.txt"), "Sepsis bundle.\n\nGive antibiotics within one hour.\n")
    write(os.path.join(root, "guidelines", "asthma", "step-up.md"), "# Asthma\n\nStep up when uncontrolled.\n")
    write(os.path.join(root, "guidelines", "empty.txt"), "\n")
    return os.path.join(root, "guidelines")


MAKERS = {"slake": make_slake, "vqa-rad": make_vqa_rad_parquet, "pathvqa": make_pathvqa, "pmc-vqa": make_pmc_vqa,
          "mmmu": make_mmmu, "mmmu-pro": make_mmmu_pro, "medxpertqa": make_medxpertqa, "medframeqa": make_medframeqa,
          "medqa": make_medqa, "medmcqa": make_medmcqa, "pubmedqa": make_pubmedqa, "medbullets": make_medbullets,
          "mimic-cxr": make_mimic_cxr, "iu-xray": make_iu_xray, "chexpert-plus": make_chexpert_plus, "llava-med": make_llava_med, "pmc-oa": make_pmc_oa, "roco": make_roco,
          "rocov2": make_rocov2, "pmc-articles": make_pmc_articles, "pubmed": make_pubmed, "text": make_text}


def make_raw(root):
    """Every release, each in its own folder under root."""
    return {name: make(root) for name, make in MAKERS.items()}
