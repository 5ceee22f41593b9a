"""Strict scoring rules of eval.py on realistic model responses, right and wrong, per question type."""
import difflib

import pytest

import eval as ev

OPTIONS = {"A": "Pneumothorax", "B": "Pleural effusion", "C": "Cardiomegaly", "D": "Atelectasis"}

# (response, letters it chooses); the answer is B throughout
MC_CASES = [
    # a leading letter token
    ("B", ["B"]),
    ("b", ["B"]),
    ("(B)", ["B"]),
    ("B.", ["B"]),
    ("B)", ["B"]),
    ("B:", ["B"]),
    ("[B]", ["B"]),
    ("B. Pleural effusion", ["B"]),
    ("(b) pleural effusion", ["B"]),
    ("B: Pleural effusion is seen at the left base.", ["B"]),
    ("B\nThe fluid layers dependently.", ["B"]),
    ("B is correct.", ["B"]),
    ("B, a small effusion layering posteriorly.", ["B"]),   # "a" after the comma is an article
    ("B, I think.", ["B"]),
    ("B and the fluid is free-flowing.", ["B"]),
    ("Choice (B)", ["B"]),
    ("**B**", ["B"]),
    ("**B.** Pleural effusion", ["B"]),
    ("Option B", ["B"]),
    ("  B. ", ["B"]),
    # explicit answer markers
    ("\\boxed{B}", ["B"]),
    ("The answer is \\boxed{B}.", ["B"]),
    ("\\boxed{\\text{B}}", ["B"]),
    ("\\boxed{b. pleural effusion}", ["B"]),
    ("<answer>B</answer>", ["B"]),
    ("<answer> b </answer>", ["B"]),
    ("<answer>Pleural effusion</answer>", ["B"]),
    ("The answer is B.", ["B"]),
    ("The correct answer is (B).", ["B"]),
    ("Answer: B", ["B"]),
    ("answer: b) pleural effusion", ["B"]),
    ("Final answer: **B**", ["B"]),
    ("The answer is: B", ["B"]),
    ("I think the answer is B.", ["B"]),               # "I" is a word here, not option I
    ("A large effusion blunts the angle, so the answer is B.", ["B"]),   # "A" is an article
    ("Looking at the costophrenic angle...\nAnswer: B", ["B"]),
    ("B. Pleural effusion. The answer is B.", ["B"]),  # the same letter twice is one choice
    ("The answer is pleural effusion.", ["B"]),        # option text after the marker
    # the option's text, exactly (after normalisation)
    ("Pleural effusion", ["B"]),
    ("pleural effusion.", ["B"]),
    ("  PLEURAL   EFFUSION ", ["B"]),
    # wrong: nothing, several, another option, an unknown letter
    ("", []),
    ("   ", []),
    ("Pleural", []),
    ("There is a pleural effusion.", []),
    ("effusion", []),
    ("I don't know.", []),
    ("A large effusion", []),
    ("a small pneumothorax", []),
    ("Both B and C are plausible.", []),
    ("B or C", ["B", "C"]),
    ("B, C", ["B", "C"]),
    ("B/C", ["B", "C"]),
    ("B and C", ["B", "C"]),
    ("(B) or (C)", ["B", "C"]),
    ("A or B", ["A", "B"]),
    ("b, c and d", ["B", "C", "D"]),
    ("<answer>B or C</answer>", ["B", "C"]),
    ("The answer is B. On reflection, the answer is C.", ["B", "C"]),
    ("B. Pleural effusion\n\\boxed{C}", ["B", "C"]),
    ("C", ["C"]),
    ("\\boxed{C}", ["C"]),
    ("The answer is D.", ["D"]),
    ("Cardiomegaly", ["C"]),
    ("A", ["A"]),
    ("A. Pneumothorax", ["A"]),
    ("A is correct", ["A"]),
    ("E", ["E"]),
    ("The answer is E.", ["E"]),
]


@pytest.mark.parametrize("response,letters", MC_CASES)
def test_parse_choice(response, letters):
    assert ev.parse_choice(response, OPTIONS) == letters


@pytest.mark.parametrize("response,letters", MC_CASES)
def test_multiple_choice_correct_only_for_exactly_the_answer(response, letters):
    item = {"question_type": "multiple_choice", "options": OPTIONS, "answer": "B"}
    assert ev.score_item(item, response)["correct"] == (letters == ["B"])


def test_ten_option_letters():
    options = {chr(ord("A") + i): f"finding {i}" for i in range(10)}   # MMMU-Pro's ten options, A..J
    assert ev.parse_choice("J", options) == ["J"]
    assert ev.parse_choice("I.", options) == ["I"]
    assert ev.parse_choice("(I) finding 8", options) == ["I"]
    assert ev.parse_choice("I think it is J", options) == []      # no marker: "I" is a word, "J" is not read
    assert ev.parse_choice("I think the answer is J", options) == ["J"]
    assert ev.parse_choice("finding 9", options) == ["J"]


def test_two_options_with_the_same_text_are_ambiguous():
    options = {"A": "Liver", "B": "liver.", "C": "Spleen"}
    assert ev.parse_choice("Liver", options) == ["A", "B"]


def _medevalkit_closest(response, options):
    """MedEvalKit's find_most_similar_index, re-stated: highest SequenceMatcher ratio, first wins ties."""
    ratios = [difflib.SequenceMatcher(None, text.lower(), response.lower()).ratio() for text in options.values()]
    return list(options)[ratios.index(max(ratios))]


@pytest.mark.parametrize("response", ["pleural effusions are present", "small left pneumothorax",
                                      "enlarged cardiac silhouette: cardiomegaly", "atelectasis at the base",
                                      "Effusion, pleural"])
def test_lenient_closest_option_matches_medevalkit(response):
    assert ev.closest_option(response, OPTIONS) == _medevalkit_closest(response, OPTIONS)


def test_lenient_is_reported_apart_and_only_rescues_unparsed_responses():
    item = {"question_type": "multiple_choice", "options": OPTIONS, "answer": "B"}
    fuzzy = ev.score_item(item, "pleural effusions are present", lenient=True)
    assert fuzzy["correct"] is False and fuzzy["lenient_correct"] is True
    strict_right = ev.score_item(item, "B", lenient=True)
    assert strict_right["correct"] is True and strict_right["lenient_correct"] is True
    two = ev.score_item(item, "B or C", lenient=True)           # ambiguous stays wrong
    assert two["correct"] is False and two["lenient_correct"] is False
    other = ev.score_item(item, "C. Pleural effusion", lenient=True)   # a wrong letter is never rescued
    assert other["lenient_correct"] is False
    assert ev.score_item(item, "", lenient=True)["lenient_correct"] is False
    assert "lenient_correct" not in ev.score_item(item, "B")


YES_NO_CASES = [
    ("yes", "yes"), ("Yes", "yes"), ("YES.", "yes"), ("yes!", "yes"), ("**Yes**", "yes"),
    ("Yes, there is a fracture of the distal radius.", "yes"),
    ("yes - the lesion enhances", "yes"),
    ("Yes, no other abnormality is seen.", "yes"),   # "no" begins a phrase, not a second answer
    ("Yes.\nThe mass is in the left lobe.", "yes"),
    ("no", "no"), ("No.", "no"), ("No, the heart size is normal.", "no"), ("no;", "no"),
    ("  no  ", "no"),
    # wrong or unparseable
    ("", None), ("Yesterday", None), ("Nope", None), ("Not sure", None), ("y", None),
    ("The answer is yes", None), ("There is no fracture.", None),
    ("yes or no", None), ("Yes/No", None), ("No, yes.", None), ("yes and no", None), ("Yes, no.", None),
]


@pytest.mark.parametrize("response,said", YES_NO_CASES)
def test_parse_yes_no(response, said):
    assert ev.parse_yes_no(response) == said


@pytest.mark.parametrize("response,said", YES_NO_CASES)
def test_yes_no_correct(response, said):
    for answer in ("yes", "no"):
        item = {"question_type": "yes_no", "options": None, "answer": answer}
        assert ev.score_item(item, response)["correct"] == (said == answer)


CLOSED_CASES = [
    ("liver", "Liver", True), ("liver", "liver.", True), ("liver", "  LIVER \n", True), ("liver", "Liver!", True),
    ("left lung", "Left   lung.", True), ("left lung", "left\tlung", True), ("MRI", "mri", True),
    ("T2", "t2.", True),
    ("liver", "The liver", False), ("liver", "liver and spleen", False), ("liver", "", False),
    ("liver", "livers", False), ("left lung", "left-lung", False), ("left lung", "right lung", False),
    ("CT", "MRI", False),
]


@pytest.mark.parametrize("answer,response,correct", CLOSED_CASES)
@pytest.mark.parametrize("qtype", ["closed", "open"])
def test_closed_and_open_exact_match(qtype, answer, response, correct):
    item = {"question_type": qtype, "options": None, "answer": answer}
    assert ev.score_item(item, response)["correct"] is correct


def test_normalize():
    assert ev.normalize("  The  Liver.\n") == "the liver"
    assert ev.normalize("yes!?") == "yes"
    assert ev.normalize("3.5 cm") == "3.5 cm"          # only trailing punctuation goes
    assert ev.normalize("...") == ""


def _reference_recall_f1(prediction, answer):
    """SQuAD's token F1 (multiset overlap), written out independently of eval.py."""
    import re
    pred = re.findall(r"\w+", prediction.lower())
    gold = re.findall(r"\w+", answer.lower())
    remaining, overlap = list(gold), 0
    for token in pred:
        if token in remaining:
            remaining.remove(token)
            overlap += 1
    if overlap == 0:
        return 0.0, 0.0
    p, r = overlap / len(pred), overlap / len(gold)
    return r, 2 * p * r / (p + r)


@pytest.mark.parametrize("prediction,answer", [
    ("in the right lower lobe", "right lower lobe"),
    ("Right lower lobe.", "right lower lobe"),
    ("lobe lobe lobe", "right lower lobe"),
    ("the left kidney", "right lower lobe"),
    ("", "right lower lobe"),
    ("brain, brain and lung", "brain lung"),
])
def test_open_token_recall_and_f1(prediction, answer):
    item = {"question_type": "open", "options": None, "answer": answer}
    fields = ev.score_item(item, prediction)
    recall, f1 = _reference_recall_f1(prediction, answer)
    assert fields["token_recall"] == pytest.approx(recall)
    assert fields["token_f1"] == pytest.approx(f1)


def test_open_partial_answer_recall_by_hand():
    recall, f1 = ev.token_recall_f1("in the right lower lobe", "right lower lobe")
    assert recall == 1.0 and f1 == pytest.approx(2 * 0.6 / 1.6)


def test_report_scores_carry_rouge_not_accuracy():
    item = {"question_type": "report", "options": None, "answer": "Findings: clear lungs. Impression: normal."}
    fields = ev.score_item(item, "Findings: clear lungs. Impression: normal.")
    assert fields["correct"] is None and fields["rouge_l"] == pytest.approx(1.0)
