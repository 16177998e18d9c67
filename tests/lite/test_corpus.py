"""The embedded corpus: determinism, disjoint splits, and German morphology on generated sentences."""
import re

from lite.corpus import ANIMALS, PEOPLE, PLACES, STATIC_VERBS, THINGS, TRANSITIVE_VERBS, Grammar, generate_pairs, \
    noun_phrase, prepositional_phrase, write_default_corpus

NOUNS = {n.de: n for n in PEOPLE + ANIMALS + THINGS + PLACES}


def test_generate_pairs_is_deterministic_and_distinct():
    pairs = generate_pairs(500, seed=7)
    assert pairs == generate_pairs(500, seed=7)
    assert pairs != generate_pairs(500, seed=8)
    assert len({de for de, _ in pairs}) == 500
    assert generate_pairs(100, seed=7) == pairs[:100]


def test_sentences_look_like_captions():
    for de, en in generate_pairs(300, seed=1):
        for text in (de, en):
            assert text[0].isupper() and text.endswith(".") and "  " not in text and text == text.strip()


def test_noun_phrases_decline_by_gender_case_and_article():
    """Expected forms from a German grammar table, one cell per assertion."""
    hund, katze, pferd, junge, kind = (NOUNS[w] for w in ("Hund", "Katze", "Pferd", "Junge", "Kind"))
    assert noun_phrase(hund, "nom", "indef", ["klein"]) == ("ein kleiner Hund", "a small dog")
    assert noun_phrase(hund, "acc", "indef", ["klein"]) == ("einen kleinen Hund", "a small dog")
    assert noun_phrase(katze, "dat", "indef", ["schwarz"]) == ("einer schwarzen Katze", "a black cat")
    assert noun_phrase(pferd, "nom", "indef", ["alt", "weiß"]) == ("ein altes weißes Pferd", "an old white horse")
    assert noun_phrase(pferd, "nom", "def", ["alt"]) == ("das alte Pferd", "the old horse")
    assert noun_phrase(hund, "acc", "def", ["müde"]) == ("den müden Hund", "the tired dog")
    assert noun_phrase(hund, "nom", "indef", ["müde"]) == ("ein müder Hund", "a tired dog")
    assert noun_phrase(junge, "acc", "indef", []) == ("einen Jungen", "a boy")  # weak noun
    assert noun_phrase(kind, "nom", "drei", ["klein"]) == ("drei kleine Kinder", "three small children")
    assert noun_phrase(kind, "dat", "drei", ["klein"]) == ("drei kleinen Kindern", "three small children")
    assert noun_phrase(katze, "dat", "def_pl", []) == ("den Katzen", "the cats")
    assert prepositional_phrase(NOUNS["Park"], "in", "dat", ["groß"]) == ("im großen Park", "in the big park")
    assert prepositional_phrase(NOUNS["Wiese"], "über", "acc", []) == ("über die Wiese", "across the meadow")
    assert prepositional_phrase(NOUNS["Wasser"], "in", "acc", []) == ("ins Wasser", "into the water")


def test_subject_and_verb_agree_in_generated_sentences():
    """Sentences that start with a number have a plural verb in both languages; with "Ein" a singular one."""
    pairs = generate_pairs(2000, seed=3)
    plural = [(de, en) for de, en in pairs if re.match(r"(Zwei|Drei|Vier|Fünf) \w+ (laufen|spielen|schlafen)\b", de)]
    singular = [(de, en) for de, en in pairs if re.match(r"Ein \w+ (läuft|spielt|schläft)\b", de)]
    assert plural and singular
    for de, en in plural:
        assert re.match(r"(Two|Three|Four|Five) \w+( \w+)? (run|play|sleep)\b", en), (de, en)
    for de, en in singular:
        assert re.match(r"An? \w+( \w+)? (runs|plays|sleeps)\b", en), (de, en)


def test_relative_clause_and_fronted_place_in_generated_sentences():
    pairs = generate_pairs(2000, seed=3)
    relative = [(de, en) for de, en in pairs if re.match(r"Ein \w+ \w+, der ", de)]
    assert relative and all(" who " in en or " that " in en for _, en in relative)
    # V2: a fronted place puts the verb second and the subject after it, English keeps S-V-O
    verbs = {form for v in STATIC_VERBS + TRANSITIVE_VERBS for form in (v.de, v.de_pl)}
    fronted = [(de, en) for de, en in pairs if de.startswith("Im Park ")]
    assert fronted and all(de.split()[2] in verbs and en.endswith(" in the park.") for de, en in fronted)


def test_grammar_covers_its_vocabulary():
    grammar = Grammar(seed=0)
    german = " ".join(grammar.sentence()[0] for _ in range(6000))
    unused = [noun for noun in NOUNS if not re.search(rf"\b{noun}\b", german)]
    assert not unused


def test_write_default_corpus(tmp_path):
    out = write_default_corpus(tmp_path / "corpus", n_train=6000, n_valid=300, n_test=300)
    assert out == tmp_path / "corpus"
    german = {}
    for split, n in (("train", 6000), ("valid", 300), ("test", 300)):
        raw = {lang: (out / f"{split}.{lang}").read_bytes() for lang in ("de", "en")}
        assert all(b"\r" not in text and text.endswith(b"\n") for text in raw.values())
        lines = {lang: text.decode("utf-8").splitlines() for lang, text in raw.items()}
        assert len(lines["de"]) == len(lines["en"]) == n
        german[split] = set(lines["de"])
    assert not german["train"] & german["valid"] and not german["train"] & german["test"]
    assert not german["valid"] & german["test"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{l}" for s in german for l in ("de", "en"))
    assert (out / "train.de").read_text(encoding="utf-8") == write_default_corpus(tmp_path / "again").joinpath(
        "train.de").read_text(encoding="utf-8")
