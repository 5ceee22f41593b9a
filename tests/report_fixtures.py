"""Chest X-ray report data sets written in their release layouts, for tests/test_mimic.py and the eval tests.

- MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports: `mimic-cxr-2.0.0-split.csv.gz` (dicom_id, study_id, subject_id, split),
  `mimic-cxr-2.0.0-metadata.csv.gz` (the release's 12 columns: ViewPosition, StudyDate YYYYMMDD, StudyTime
  HHMMSS.fff), images `files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg`, reports `files/pNN/pSUBJECT/sSTUDY.txt` in the
  reports' style (a title line, then ' NAME:' sections, every line indented by one space).
- IU-Xray (OpenI): `ecgen-radiology/N.xml` (eCitation, AbstractText Label=..., parentImage id=...) and
  `NLMCXR_png/<id>.png`. Kaggle (raddar/chest-xrays-indiana-university): `indiana_reports.csv`,
  `indiana_projections.csv` (projection Frontal / Lateral), `images/images_normalized/<uid>_IM-....dcm.png`.
  R2Gen (zhjohnchan/R2Gen): `annotation.json` (train / val / test) and `images/<id>/0.png, 1.png`.
- CheXpert Plus: `df_chexpert_plus_240401.csv` (an unnamed index column first, then path_to_image, ...,
  section_findings, section_impression, ..., split) and `PNG/train/patientN/studyM/viewK_frontal.png`.

Images are crops of a real chest radiograph (pydicom-data RG1_UNCR.dcm, NEMA WG04, MIT package); report sentences
come from radlabels' synthetic MIMIC-style reports (MIT). Every study's expected findings/impression is returned
beside the files, taken from the text the fixture writes, never from the code under test.

- RaTEScore's models (`write_ratescore_models`): `RaTE-NER-Deberta/` (Angelakeke/RaTE-NER-Deberta: a DeBERTa-v3
  token classifier, its 11 labels in config.json) and `BioLORD-2023-C/` (FremyCompany/BioLORD-2023-C: an MPNet
  sentence encoder), both randomly initialised at tiny sizes, with vocabularies learnt from the reports scored.
"""
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import report_metrics

METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
VIEW_CODES = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral",
              "AP AXIAL": "antero-posterior", "": ""}


def chest_radiograph():
    """pydicom-data's RG1 chest radiograph as 8-bit grey (MONOCHROME1 inverted), once per process."""
    if not hasattr(chest_radiograph, "pixels"):
        import pydicom
        from pydicom.data import get_testdata_file
        ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
        pixels = ds.pixel_array.astype(np.float64)
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = 255 - pixels
        chest_radiograph.pixels = pixels.astype(np.uint8)
    return chest_radiograph.pixels


def xray_jpeg(seed, fmt="JPEG"):
    """A distinct crop of the radiograph (offset and size from `seed`), 72 x 60 px, as file bytes."""
    pixels = chest_radiograph()
    rng = np.random.default_rng(seed)
    h, w = pixels.shape
    size = int(rng.integers(h // 3, h // 2))
    top, left = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
    image = Image.fromarray(pixels[top:top + size, left:left + size]).resize((72, 60), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def radlabels_sections(n):
    """(findings, impression) paragraphs of the first `n` radlabels reports that hold exactly one FINDINGS and one
    IMPRESSION section, in that order, impression last: whitespace collapsed."""
    spec = importlib.util.find_spec("radlabels")
    assert spec is not None, "radlabels is not installed: run `make setup` (it installs radlabels --no-deps)"
    folder = Path(spec.submodule_search_locations[0]) / "samples" / "synthetic_reports"
    pairs = []
    for file in sorted(folder.glob("synth_*.txt")):
        text = file.read_text()
        parts = re.split(r"\n ([A-Z ()/,-]+):\s", text)
        names = parts[1::2]
        if names.count("FINDINGS") == 1 and names.count("IMPRESSION") == 1 and names[-1] == "IMPRESSION" \
                and names[-2] == "FINDINGS":
            findings, impression = " ".join(parts[-3].split()), " ".join(parts[-1].split())
            if findings and impression and ":" not in findings + impression:
                pairs.append((findings, impression))
        if len(pairs) == n:
            return pairs
    raise AssertionError(f"radlabels holds fewer than {n} reports with FINDINGS then IMPRESSION")


def wrap(text, width=76):
    """Text as MIMIC writes it: lines of at most `width` characters, each indented by one space."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(f" {line}" for line in lines + [line])


def mimic_report(style, findings, impression):
    """A report in one of the styles the official parser handles; returns (text, expected findings, expected
    impression) as the parser's rules define them (docs/eval.md)."""
    head = ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
            " INDICATION:  ___F with cough\n \n COMPARISON:  None.\n \n")
    if style == "findings+impression":
        text = head + f" FINDINGS: \n \n{wrap(findings)}\n \n IMPRESSION: \n \n{wrap(impression)}\n"
        return text, findings, impression
    if style == "findings and impression":   # one combined section: normalised to impression
        return head + f" FINDINGS AND IMPRESSION: \n{wrap(impression)}\n", None, impression
    if style == "conclusion":                # CONCLUSION is impression; the findings section stays findings
        return head + f" FINDINGS:\n{wrap(findings)}\n \n CONCLUSION:\n{wrap(impression)}\n", findings, impression
    if style == "findings/impression":
        return head + f" FINDINGS/IMPRESSION: \n{wrap(impression)}\n", None, impression
    if style == "findings only":             # an empty IMPRESSION section is dropped
        return head + f" FINDINGS: \n{wrap(findings)}\n \n IMPRESSION: \n \n", findings, None
    if style == "no headings":   # everything after the first paragraph break is 'last_paragraph': the impression
        text = ("                                 FINAL REPORT\n PORTABLE CHEST OF ___\n \n"
                f"{wrap(findings)}\n \n{wrap(impression)}\n")
        return text, None, f"{findings} {impression}"
    raise ValueError(style)


# subject -> (split, [(study_id, StudyDate, StudyTime, [ViewPosition...], report style)]); StudyTime as MIMIC
# writes it (a number: no leading zeros, three decimals)
MIMIC_SUBJECTS = {
    "10000032": ("test", [("50414267", "21800506", "213014.531", ["PA", "LATERAL"], "findings+impression"),
                          ("53189527", "21800626", "165500.312", ["AP"], "conclusion"),
                          ("53911762", "21800723", "80556.875", ["LATERAL", "LL", "PA"], "findings and impression")]),
    "10000764": ("test", [("57375967", "21321014", "123500.0", ["AP", ""], "no headings")]),
    "10000898": ("test", [("50771383", "21800110", "90000.0", ["PA"], "findings/impression"),
                          ("54205396", "21800110", "93000.0", ["AP AXIAL", "PA"], "findings only")]),
    "10001217": ("train", [("58913004", "21570410", "101010.0", ["PA", "LATERAL"], "findings+impression"),
                           ("52067803", "21570918", "142200.5", ["AP"], "findings+impression")]),
    "10001401": ("train", [("51065211", "21310510", "151600.0", ["PA", "LATERAL"], "findings+impression"),
                           ("56591769", "21310611", "80100.0", ["PA"], "conclusion")]),
    "10002013": ("train", [("59016811", "21600101", "120000.0", ["PA", "LATERAL"], "findings+impression")]),
    "10002428": ("validate", [("56979425", "21560302", "91500.0", ["AP"], "findings+impression")]),
}


# ----------------------------------------------------------------------------------------------------------
# Report metrics' models: random, tiny, of the released architectures, saved where report_metrics.py reads them


def report_words(reports):
    """Lower-case words and punctuation of `reports`: a tiny model's whole vocabulary."""
    return sorted({w for r in reports for w in re.findall(r"[a-z0-9]+|[^a-z0-9\s]", r.lower())})


def tiny_bert(path, words, hidden=32, layers=2):
    """A randomly initialised BERT (bert-base-uncased's architecture, tiny sizes) with an uncased WordPiece
    vocabulary of `words`, saved as a local model directory; returns (BertModel, BertConfig)."""
    import transformers
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    os.makedirs(path, exist_ok=True)
    Path(path, "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(Path(path, "vocab.txt")), do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=512)
    config.save_pretrained(path)
    return transformers.BertModel(config), config


def write_chexbert_model(path, reports):
    """A random CheXbert in its release form: `chexbert.pth` = {'epoch', 'model_state_dict'} of the DataParallel-
    wrapped labeler (module.bert.* + 14 linear heads), beside bert-base-uncased's config, vocab (tiny) and the
    BERT weights; returns the state dict."""
    bert, _ = tiny_bert(path, report_words(reports))
    bert.save_pretrained(path)   # f1chexbert's bert_labeler(pretrain_path=...) starts from these weights
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    for i in range(14):   # 13 findings x (blank, positive, negative, uncertain) + No Finding x 2
        state[f"module.linear_heads.{i}.weight"] = torch.randn(4 if i < 13 else 2, bert.config.hidden_size)
        state[f"module.linear_heads.{i}.bias"] = torch.randn(4 if i < 13 else 2)
    torch.save({"epoch": 3, "model_state_dict": state}, Path(path, "chexbert.pth"))
    return state


def write_bertscore_model(path, reports):
    """A random distilroberta-base (6 layers, tiny width) with a byte-level BPE trained on `reports`, saved as a
    local model directory the way distilroberta-base ships (config, weights, vocab.json, merges.txt)."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    os.makedirs(path, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(reports, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(path))
    tokenizer = transformers.RobertaTokenizer(str(Path(path, "vocab.json")), str(Path(path, "merges.txt")),
                                              model_max_length=512)   # as distilroberta-base's tokenizer
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=6,
                                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=514,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    transformers.RobertaModel(config).save_pretrained(path)
    return path


# The radgraph package's model directory as its radgraph.tar.gz unpacks: config.json (DyGIE++'s
# training_config/template.libsonnet, as AllenNLP writes it out), vocabulary/ (AllenNLP's files) and weights.th
# (the model's state dict). Labels: RadGraph's schema (4 entity types; 3 relations).
RADGRAPH_ENTITY_LABELS = ["ANAT-DP", "OBS-DP", "OBS-U", "OBS-NA"]
RADGRAPH_RELATION_LABELS = ["modify", "located_at", "suggestive_of"]


def radgraph_config(bert_dir):
    bert = {"type": "pretrained_transformer_mismatched", "model_name": str(bert_dir), "max_length": 512}
    return {
        "dataset_reader": {"type": "dygie", "token_indexers": {"bert": bert}, "max_span_width": 8},
        "model": {
            "type": "dygie", "embedder": {"token_embedders": {"bert": bert}},
            "initializer": {"regexes": [["_span_width_embedding.weight", {"type": "xavier_normal"}]]},
            "module_initializer": {"regexes": [[".*weight", {"type": "xavier_normal"}],
                                               [".*weight_matrix", {"type": "xavier_normal"}]]},
            "loss_weights": {"ner": 0.2, "relation": 1.0, "coref": 0.0, "events": 0.0},
            "feature_size": 20, "max_span_width": 8, "target_task": "relation",
            "feedforward_params": {"num_layers": 2, "hidden_dims": 150, "dropout": 0.4},
            "modules": {"coref": {"spans_per_word": 0.3, "max_antecedents": 100, "coref_prop": 0}, "ner": {},
                        "relation": {"spans_per_word": 0.5},
                        "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                                   "loss_weights": {"trigger": 0.2, "arguments": 1.0}}},
        },
    }


def write_radgraph_model(root, reports):
    """`root/radgraph/` (what MEDGPT_RADGRAPH_MODEL=root points the radgraph package at) holding a random DyGIE
    model over a tiny BERT (`root/radgraph-bert/`). The NER scorer is scaled and shifted so that about one span
    in four words is an entity, and relation scores raised so that some entity pairs are related: a random model
    otherwise labels every span or none, and RadGraph-F1 would be 0 or meaningless."""
    from radgraph.allennlp.data import Vocabulary
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models import dygie
    bert_dir, model_dir = Path(root, "radgraph-bert"), Path(root, "radgraph")
    bert, _ = tiny_bert(bert_dir, report_words(reports))
    bert.save_pretrained(bert_dir)
    config = radgraph_config(bert_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    vocab = Vocabulary(non_padded_namespaces=["*labels", "*tags"])
    vocab.add_tokens_to_namespace([""] + RADGRAPH_ENTITY_LABELS, "radgraph__ner_labels")   # "" (no entity) is 0
    vocab.add_tokens_to_namespace(RADGRAPH_RELATION_LABELS, "radgraph__relation_labels")
    vocab.save_to_files(str(model_dir / "vocabulary"))
    with report_metrics.transformers4_tokenizer_api():
        embedder = token_embedders.PretrainedTransformerMismatchedEmbedder(model_name=str(bert_dir), max_length=512)
    kwargs = {k: v for k, v in config["model"].items()
              if k not in ("type", "embedder", "initializer", "module_initializer")}
    torch.manual_seed(0)
    model = dygie.DyGIE(vocab=vocab, embedder=text_field_embedders.BasicTextFieldEmbedder({"bert": embedder}),
                        **kwargs)
    with torch.no_grad():
        ner_out = model._ner._ner_scorers["radgraph__ner_labels"][1]._module
        ner_out.weight *= 10
        ner_out.bias -= 1.6
        model._relation._relation_scorers["radgraph__relation_labels"].bias += 3
    torch.save(model.state_dict(), model_dir / "weights.th")
    return root


def dicom_id(subject, study, n):
    """A MIMIC-style dicom_id: five dash-separated groups of eight hex digits."""
    digest = hashlib.sha256(f"{subject}/{study}/{n}".encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def write_csv_gz(path, header, rows):
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_mimic_cxr(root, leak_test_image_into_train=False):
    """MIMIC-CXR-JPG + reports under `root`; returns {study key: expected dict} with split, subject, views (in the
    release's order of rows), dicom_ids, date-time, findings, impression, image paths and report path.
    With leak_test_image_into_train, the first train image is a byte copy of the first test image."""
    root = Path(root)
    sections = iter(radlabels_sections(len([s for _, st in MIMIC_SUBJECTS.values() for s in st])))
    split_rows, meta_rows, studies, seed = [], [], {}, 0
    for subject, (split, subject_studies) in MIMIC_SUBJECTS.items():
        for study, date, time, views, style in subject_studies:
            text, findings, impression = mimic_report(style, *next(sections))
            folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
            (folder / f"s{study}").mkdir(parents=True, exist_ok=True)
            (folder / f"s{study}.txt").write_text(text)
            expected = {"split": split, "subject": subject, "views": views, "dicom_ids": [], "images": [],
                        "when": (int(date), float(time)), "findings": findings, "impression": impression,
                        "report": folder / f"s{study}.txt", "style": style}
            for n, view in enumerate(views):
                dicom = dicom_id(subject, study, n)
                image = folder / f"s{study}" / f"{dicom}.jpg"
                image.write_bytes(xray_jpeg(seed))
                seed += 1
                split_rows.append([dicom, study, subject, split])
                meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, date, time,
                                  "CHEST (PA AND LAT)", VIEW_CODES[view], "Erect"])
                expected["dicom_ids"].append(dicom)
                expected["images"].append(image)
            studies[f"s{study}"] = expected
    if leak_test_image_into_train:
        test = next(s for s in studies.values() if s["split"] == "test")
        train = next(s for s in studies.values() if s["split"] == "train")
        train["images"][0].write_bytes(test["images"][0].read_bytes())
    write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta_rows)
    return studies


IU_REPORT = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr" />
   <uId id="CXR{n}" />
   <pmcId id="{n}" />
   <docSource>CXR</docSource>
   <IUXRId id="{n}" />
   <licenseType>open-access</licenseType>
   <licenseURL>http://creativecommons.org/licenses/by-nc-nd/4.0/</licenseURL>
   <ccLicense>byncnd</ccLicense>
   <articleURL />
   <articleDate>2013-08-01</articleDate>
   <articleType>XR</articleType>
   <publisher>Indiana University</publisher>
   <title>Indiana University Chest X-ray Collection</title>
   <note>The data are drawn from multiple hospital systems.</note>
   <specialty>pulmonary diseases</specialty>
   <subset>CXR</subset>
   <MedlineCitation Owner="Indiana University" Status="supplied">
      <Article PubModel="Electronic">
         <Journal>
            <JournalIssue>
               <PubDate>
                  <Year>2013</Year>
                  <Month>08</Month>
                  <Day>01</Day>
               </PubDate>
            </JournalIssue>
         </Journal>
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Positive TB test</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
         <Affiliation>Indiana University</Affiliation>
         <AuthorList CompleteYN="Y">
            <Author ValidYN="Y">
               <LastName>Kohli</LastName>
               <ForeName>Marc</ForeName>
               <Initials>MD</Initials>
            </Author>
         </AuthorList>
         <Language>eng</Language>
         <PublicationTypeList>
            <PublicationType>Radiology Report</PublicationType>
         </PublicationTypeList>
         <ArticleDate>
            <Year>2013</Year>
            <Month>08</Month>
            <Day>01</Day>
         </ArticleDate>
      </Article>
      <EIDs>
         <EID />
      </EIDs>
   </MedlineCitation>
   <MeSH>
      <major>normal</major>
   </MeSH>
{images}</eCitation>
"""
IU_IMAGE = """   <parentImage id="{id}">
      <figureId>F{k}</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/{id}.jpg</url>
         <imgModality>7</imgModality>
         <region type="panel">
            <globalImageFeatures>
               <CEDD>f2p0k1106</CEDD>
            </globalImageFeatures>
         </region>
      </panel>
   </parentImage>
"""


def write_iu_xray(root):
    """ecgen-radiology/1.xml .. 3.xml and NLMCXR_png/; returns {uId: {findings, impression, images}}.
    Report 3 has an empty FINDINGS (OpenI writes <AbstractText Label="FINDINGS"/>)."""
    root = Path(root)
    (root / "ecgen-radiology").mkdir(parents=True)
    (root / "NLMCXR_png").mkdir(parents=True)
    expected = {}
    for n, (findings, impression) in enumerate(radlabels_sections(3), 1):
        ids = [f"CXR{n}_1_IM-{n:04d}-{k}001" for k in (1, 2)][: 1 if n == 2 else 2]
        images = "".join(IU_IMAGE.format(id=image_id, k=k) for k, image_id in enumerate(ids, 1))
        for k, image_id in enumerate(ids):
            (root / "NLMCXR_png" / f"{image_id}.png").write_bytes(xray_jpeg(100 + 10 * n + k, "PNG"))
        xml = IU_REPORT.format(n=n, findings=findings if n != 3 else "", impression=impression, images=images)
        if n == 3:
            xml = xml.replace('<AbstractText Label="FINDINGS"></AbstractText>', '<AbstractText Label="FINDINGS"/>')
        (root / "ecgen-radiology" / f"{n}.xml").write_text(xml)
        expected[f"CXR{n}"] = {"findings": findings if n != 3 else None, "impression": impression,
                               "images": [root / "NLMCXR_png" / f"{i}.png" for i in ids]}
    return expected


CHEXPERT_COLUMNS = ["", "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
                    "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
                    "section_history", "section_comparison", "section_technique", "section_procedure_comments",
                    "section_findings", "section_impression", "section_end_of_impression", "section_summary",
                    "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
                    "insurance_type", "recent_bmi", "deceased", "split"]


def write_chexpert_plus(root):
    """df_chexpert_plus_240401.csv and PNG/{split}/patientN/studyM/viewK_*.png; returns {study folder: expected}.
    patient00002 has two studies (the second's prior is the first); one valid study has no findings section."""
    root = Path(root)
    rows, expected = [], {}
    plan = [("valid", "patient00001", 1, [("Frontal", "PA"), ("Lateral", "")], True),
            ("valid", "patient00002", 1, [("Frontal", "AP")], True),
            ("valid", "patient00002", 2, [("Lateral", ""), ("Frontal", "AP")], False),
            ("train", "patient00003", 1, [("Frontal", "PA")], True)]
    for i, ((split, patient, study, views, has_findings), (findings, impression)) in \
            enumerate(zip(plan, radlabels_sections(len(plan)))):
        folder = f"{split}/{patient}/study{study}"
        expected[folder] = {"split": split, "findings": findings if has_findings else None,
                            "impression": impression, "images": [], "views": views}
        for k, (side, projection) in enumerate(views, 1):
            rel = f"{folder}/view{k}_{side.lower()}.jpg"
            png = root / "PNG" / f"{folder}/view{k}_{side.lower()}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            png.write_bytes(xray_jpeg(200 + 10 * i + k, "PNG"))
            expected[folder]["images"].append(png)
            report = f"NARRATIVE: ... FINDINGS: {findings} IMPRESSION: {impression}"
            rows.append([len(rows), rel, rel.replace(".jpg", ".dcm"), side, projection, patient, study, report,
                         "", "", "", "", "", "", findings if has_findings else "", impression, "", "", "", 61.0,
                         "Female", "White", "Non-Hispanic/Non-Latino", "No", "Medicare", 24.1, "No", split])
    with open(root / "df_chexpert_plus_240401.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CHEXPERT_COLUMNS)
        writer.writerows(rows)
    return expected


IU_KAGGLE_REPORT_COLUMNS = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
# uid -> [(filename, projection)] in indiana_projections.csv's order (rows of the real file: uid 10's frontal is
# its 2001 image, uid 42 has two laterals, uid 62 two frontals, uid 74 a lateral only); uid 3 has no findings
# and uid 16 neither findings nor impression, as in the release
IU_KAGGLE_IMAGES = {
    "1": [("1_IM-0001-4001.dcm.png", "Frontal"), ("1_IM-0001-3001.dcm.png", "Lateral")],
    "3": [("3_IM-1384-1001.dcm.png", "Frontal"), ("3_IM-1384-2001.dcm.png", "Lateral")],
    "10": [("10_IM-0002-2001.dcm.png", "Frontal"), ("10_IM-0002-1001.dcm.png", "Lateral")],
    "16": [("16_IM-0389-1001.dcm.png", "Frontal"), ("16_IM-0389-2001.dcm.png", "Lateral")],
    "42": [("42_IM-2063-1001.dcm.png", "Frontal"), ("42_IM-2063-2001.dcm.png", "Lateral"),
           ("42_IM-2063-3001.dcm.png", "Lateral")],
    "62": [("62_IM-2202-12012.dcm.png", "Frontal"), ("62_IM-2202-4004.dcm.png", "Frontal"),
           ("62_IM-2202-1001.dcm.png", "Lateral")],
    "74": [("74_IM-2296-2001.dcm.png", "Lateral")],
}


def write_iu_xray_kaggle(root):
    """Kaggle's "Chest X-rays (Indiana University)" (raddar): indiana_reports.csv, indiana_projections.csv (uid,
    filename, projection) and images/images_normalized/<filename>; returns {"CXR<uid>": {findings, impression,
    images, filenames, projections}} with images in the CSV's order. Both CSVs have LF line ends, as released."""
    root = Path(root)
    folder = root / "images" / "images_normalized"
    folder.mkdir(parents=True)
    reports, projections, expected = [], [], {}
    for n, ((uid, images), (findings, impression)) in enumerate(zip(IU_KAGGLE_IMAGES.items(),
                                                                     radlabels_sections(len(IU_KAGGLE_IMAGES)))):
        findings = "" if uid in ("3", "16") else findings
        impression = "" if uid == "16" else impression
        reports.append([uid, "normal", "normal", "Xray Chest PA and Lateral", "Positive TB test", "None.", findings,
                        impression])
        entry = {"findings": findings or None, "impression": impression or None, "images": [], "filenames": [],
                 "projections": []}
        for k, (filename, projection) in enumerate(images):
            (folder / filename).write_bytes(xray_jpeg(300 + 10 * n + k, "PNG"))
            projections.append([uid, filename, projection])
            entry["images"].append(folder / filename)
            entry["filenames"].append(filename)
            entry["projections"].append(projection)
        expected[f"CXR{uid}"] = entry
    for name, header, rows in (("indiana_reports.csv", IU_KAGGLE_REPORT_COLUMNS, reports),
                               ("indiana_projections.csv", ["uid", "filename", "projection"], projections)):
        with open(root / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    return expected


# R2Gen's IU-Xray split: entries as its annotation.json writes them (ids CXR<uid>_IM-<nnnn>[-nnnn])
IU_R2GEN_SPLITS = {"train": ["CXR2384_IM-0942", "CXR2926_IM-1328", "CXR2372_IM-0933-0001"],
                   "val": ["CXR2279_IM-0865"], "test": ["CXR3030_IM-1405", "CXR2056_IM-0694-1001"]}


def write_iu_xray_r2gen(root):
    """R2Gen's iu_xray folder: annotation.json ({"train"/"val"/"test": [{"id", "report", "image_path":
    ["<id>/0.png", "<id>/1.png"], "split"}]}, one line, json.dumps' separators) and images/<id>/{0,1}.png;
    returns {id: {split, findings, images}} (the report is the findings section)."""
    root = Path(root)
    ids = [(split, i) for split, group in IU_R2GEN_SPLITS.items() for i in group]
    annotation, expected = {split: [] for split in IU_R2GEN_SPLITS}, {}
    for n, ((split, entry_id), (findings, _)) in enumerate(zip(ids, radlabels_sections(len(ids)))):
        paths = [f"{entry_id}/{k}.png" for k in (0, 1)]
        for k, rel in enumerate(paths):
            (root / "images" / entry_id).mkdir(parents=True, exist_ok=True)
            (root / "images" / rel).write_bytes(xray_jpeg(400 + 10 * n + k, "PNG"))
        annotation[split].append({"id": entry_id, "report": findings, "image_path": paths, "split": split})
        expected[entry_id] = {"split": split, "findings": findings, "images": [root / "images" / p for p in paths]}
    (root / "annotation.json").write_text(json.dumps(annotation))
    return expected


def file_sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def relpath(path, start):
    return os.path.relpath(path, start)


# ----------------------------------------------------------------------------------------------------------
# RaTEScore's two models, as the hub ships them (config.json, model.safetensors, tokenizer files), at tiny sizes

# Angelakeke/RaTE-NER-Deberta's config.json id2label, in its order (B-/I- of five entity types, O last)
RATE_NER_LABELS = ["B-ABNORMALITY", "I-ABNORMALITY", "B-NON-ABNORMALITY", "I-NON-ABNORMALITY", "B-DISEASE",
                   "I-DISEASE", "B-NON-DISEASE", "I-NON-DISEASE", "B-ANATOMY", "I-ANATOMY", "O"]


def unigram_pieces(texts):
    """A SentencePiece-style Unigram vocabulary of `texts`, [(piece, log probability)], deberta-v3's specials
    ([PAD] [CLS] [SEP] [UNK]) first: each word's letter-digit runs and punctuation (the first one marked '▁', the
    start of a word) and every single character, so that no text is [UNK]."""
    counts = Counter()
    for text in texts:
        for word in text.split():
            parts = re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9]", word)
            counts.update(["▁" + parts[0]] + parts[1:] + list(word))
    counts["▁"] += 1
    total = sum(counts.values())
    pieces = [(piece, math.log(n / total)) for piece, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return [("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0)] + pieces


def write_rate_ner(folder, texts):
    """A random DebertaV2ForTokenClassification in deberta-v3-base's configuration (relative attention, 256
    position buckets, no absolute positions), tiny sizes, RaTE-NER's labels, and a Unigram tokenizer of `texts`
    ([MASK] added after the pieces, as deberta-v3's). Written as tokenizer.json, which transformers 5 reads; the
    release's spm.model beside it would need sentencepiece."""
    import transformers
    tokenizer = transformers.DebertaV2Tokenizer(vocab=unigram_pieces(texts))
    tokenizer.save_pretrained(folder)
    config = transformers.DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7, max_relative_positions=-1,
        position_biased_input=False, type_vocab_size=0, pad_token_id=0,
        id2label=dict(enumerate(RATE_NER_LABELS)), label2id={label: i for i, label in enumerate(RATE_NER_LABELS)})
    torch.manual_seed(0)
    model = transformers.DebertaV2ForTokenClassification(config)
    # A random classifier's logits differ by about 0.1, so which label wins a token is arbitrary. RaTEScore opens
    # an entity only at a B- label: a classifier that happened to prefer O or I- everywhere would leave every
    # report with no entity, at the package's 0.5 fallback, and a test would check nothing. Raising the B- biases
    # by that spread makes entities start on most tokens whatever the seed.
    with torch.no_grad():
        model.classifier.bias[[i for i, label in enumerate(RATE_NER_LABELS) if label.startswith("B-")]] += 0.1
    model.save_pretrained(folder)


def write_biolord(folder, texts):
    """A random MPNetModel in BioLORD-2023-C's configuration (all-mpnet-base-v2's: 514 positions, 32 relative
    buckets, pad 1), tiny sizes, with an MPNet WordPiece vocabulary (<s> <pad> </s> <unk> first, then BERT's
    specials, the lower-cased words and punctuation of `texts`, <mask> last)."""
    import transformers
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + report_words(texts) \
        + ["<mask>"]
    tokenizer = transformers.MPNetTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(folder)
    config = transformers.MPNetConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=514, relative_attention_num_buckets=32, layer_norm_eps=1e-5, pad_token_id=1,
        bos_token_id=0, eos_token_id=2)
    torch.manual_seed(1)
    transformers.MPNetModel(config).save_pretrained(folder)


def write_ratescore_models(root, texts):
    """`root`/RaTE-NER-Deberta and `root`/BioLORD-2023-C, the directory MEDGPT_RATESCORE_MODEL names; returns root."""
    root = Path(root)
    write_rate_ner(root / "RaTE-NER-Deberta", texts)
    write_biolord(root / "BioLORD-2023-C", texts)
    return root
