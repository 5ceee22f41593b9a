"""
PubMed Central Open Access articles (JATS .nxml) and PubMed abstracts (PubMed XML) -> stage-2 document parts.

Design choices
- Parsing only: `parse_article` and `iter_pubmed` return plain Python values; data/convert.py turns them into
  stage-2 records and owns writing, errors and counts. Standard library only (xml.etree: no DTD loading, no
  external entities).
- An article reads in order: title, abstract, then the body's section titles and paragraphs. Each figure goes
  right after the paragraph that first cites it (`<xref ref-type="fig" rid=...>`), its label and caption after
  the image; figures never cited go at the end, in document order. Tables keep their label and caption only.
- Figure files are found next to the .nxml (the per-article `oa_package` tar unpacks to one folder): the
  `<graphic xlink:href>` name with or without its extension (.jpg first, as PMC ships both .jpg and .gif).
- PubMed: one document per `<PubmedArticle>` with an abstract: title, then each `<AbstractText>` (with its
  Label, e.g. "METHODS: ..."); parsed incrementally (iterparse) so a 30,000-article file stays small in memory.
"""
import gzip
import os
import xml.etree.ElementTree as ET

XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
NOT_INLINE = ("fig", "table-wrap", "disp-formula", "fig-group", "supplementary-material")  # not running text
FIGURE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff")


class ParseError(ValueError):
    """A file that is not the JATS or PubMed XML it should be."""


def inline_text(element):
    """Running text of an element, without the figures or tables nested in it, whitespace collapsed."""
    parts = [element.text or ""]
    for child in element:
        if child.tag not in NOT_INLINE:
            parts.append(inline_text(child))
        parts.append(child.tail or "")
    return " ".join("".join(parts).split())


def figure_caption(fig):
    label = inline_text(fig.find("label")) if fig.find("label") is not None else ""
    caption = inline_text(fig.find("caption")) if fig.find("caption") is not None else ""
    return " ".join(t for t in (label, caption) if t)


def figure_file(folder, href):
    """The file a `<graphic xlink:href>` names, in `folder`; None when absent."""
    stem, ext = os.path.splitext(href)
    candidates = [href] if ext.lower() in FIGURE_EXTENSIONS else []
    candidates += [stem + e for e in FIGURE_EXTENSIONS] if ext.lower() in FIGURE_EXTENSIONS else \
        [href + e for e in FIGURE_EXTENSIONS]
    for name in candidates:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def parse_article(path):
    """A JATS article as (blocks, figures): blocks are ("text", str) or ("figure", id), in reading order;
    figures maps id -> {"caption": str, "href": str or None, "file": path or None}."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ParseError(f"{path}: not valid XML ({e})") from None
    if root.tag != "article":
        raise ParseError(f"{path}: root element is <{root.tag}>, expected a JATS <article>")
    folder = os.path.dirname(path)
    figures = {}
    for fig in root.iter("fig"):
        graphic = fig.find(".//graphic")
        href = graphic.get(XLINK_HREF) if graphic is not None else None
        figures[fig.get("id") or f"fig{len(figures)}"] = {"caption": figure_caption(fig), "href": href,
                                                          "file": figure_file(folder, href) if href else None}
    blocks, placed = [], set()
    title = root.find("front/article-meta/title-group/article-title")
    if title is not None and inline_text(title):
        blocks.append(("text", inline_text(title)))
    for abstract in root.findall("front/article-meta/abstract"):
        walk(abstract, blocks, figures, placed)
    body = root.find("body")
    if body is not None:
        walk(body, blocks, figures, placed)
    blocks += [("figure", fig_id) for fig_id in figures if fig_id not in placed]
    return blocks, figures


def walk(element, blocks, figures, placed):
    """Append the section titles and paragraphs under `element`, each cited figure after its paragraph."""
    for child in element:
        if child.tag in ("sec", "abstract", "boxed-text"):
            walk(child, blocks, figures, placed)
        elif child.tag == "title" and inline_text(child):
            blocks.append(("text", inline_text(child)))
        elif child.tag == "p":
            text = inline_text(child)
            if text:
                blocks.append(("text", text))
            for xref in child.iter("xref"):
                for fig_id in (xref.get("rid") or "").split():
                    if xref.get("ref-type") == "fig" and fig_id in figures and fig_id not in placed:
                        placed.add(fig_id)
                        blocks.append(("figure", fig_id))
        elif child.tag == "table-wrap":
            caption = figure_caption(child)
            if caption:
                blocks.append(("text", caption))


def iter_pubmed(path):
    """Yield (pmid, title, [abstract paragraphs]) of each <PubmedArticle> in a PubMed XML file (.xml or .xml.gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        try:
            for _, element in ET.iterparse(f, events=("end",)):
                if element.tag != "PubmedArticle":
                    continue
                pmid = element.findtext("MedlineCitation/PMID") or ""
                title = element.find("MedlineCitation/Article/ArticleTitle")
                paragraphs = []
                for part in element.findall("MedlineCitation/Article/Abstract/AbstractText"):
                    text = " ".join("".join(part.itertext()).split())
                    label = part.get("Label")
                    if text:
                        paragraphs.append(f"{label}: {text}" if label else text)
                yield pmid.strip(), inline_text(title) if title is not None else "", paragraphs
                element.clear()  # keep memory flat over a whole baseline file
        except ET.ParseError as e:
            raise ParseError(f"{path}: not valid PubMed XML ({e})") from None
