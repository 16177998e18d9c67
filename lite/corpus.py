"""The embedded default corpus: German->English image-caption-like sentences from a small grammar.

Real German morphology (gender, case, adjective declension, weak nouns, agreement, V2 order, relative
clauses), generated offline and deterministically, so the whole pipeline runs without a download.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lite.files import write_lines

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Noun:
    de: str
    de_pl: str
    gender: str  # "m", "f", "n"
    en: str
    en_pl: str
    kind: str  # "person", "animal", "thing", "place"
    tags: frozenset[str] = frozenset()  # things: which verbs take them; places: their prepositions
    weak: bool = False  # n-declension: der Junge, den/dem Jungen

    def form(self, case: str, plural: bool) -> str:
        """The German noun in case: dative plural adds -n, weak nouns add -(e)n outside the nominative."""
        if plural:
            return self.de_pl + "n" if case == "dat" and self.de_pl[-1] not in "ns" else self.de_pl
        return self.de + ("n" if self.de[-1] == "e" else "en") if self.weak and case != "nom" else self.de


def _nouns(kind: str, rows: str) -> list[Noun]:
    """One noun a line: ``de de_pl gender en en_pl [tags] [weak]``; ``_`` joins words of the English."""
    nouns = []
    for row in rows.strip().splitlines():
        de, de_pl, gender, en, en_pl, *rest = row.split()
        nouns.append(Noun(de, de_pl, gender, en.replace("_", " "), en_pl.replace("_", " "), kind,
                          frozenset(t for t in rest if t != "weak"), "weak" in rest))
    return nouns


PEOPLE = _nouns("person", """
Mann Männer m man men
Frau Frauen f woman women
Kind Kinder n child children
Junge Jungen m boy boys weak
Mädchen Mädchen n girl girls
Arbeiter Arbeiter m worker workers
Lehrerin Lehrerinnen f teacher teachers
Koch Köche m cook cooks
Tänzerin Tänzerinnen f dancer dancers
Student Studenten m student students weak
Musiker Musiker m musician musicians
Polizist Polizisten m police_officer police_officers weak
Radfahrer Radfahrer m cyclist cyclists
""")
ANIMALS = _nouns("animal", """
Hund Hunde m dog dogs
Katze Katzen f cat cats
Pferd Pferde n horse horses
Vogel Vögel m bird birds
Kuh Kühe f cow cows
Schaf Schafe n sheep sheep
Ente Enten f duck ducks
Affe Affen m monkey monkeys weak
Bär Bären m bear bears weak
Ziege Ziegen f goat goats
Kaninchen Kaninchen n rabbit rabbits
""")
THINGS = _nouns("thing", """
Ball Bälle m ball balls throw
Hut Hüte m hat hats
Buch Bücher n book books read
Tasche Taschen f bag bags
Korb Körbe m basket baskets
Fahrrad Fahrräder n bicycle bicycles
Zeitung Zeitungen f newspaper newspapers read
Blume Blumen f flower flowers throw
Apfel Äpfel m apple apples throw
Flasche Flaschen f bottle bottles
Gitarre Gitarren f guitar guitars
Kamera Kameras f camera cameras
Brief Briefe m letter letters read
Jacke Jacken f jacket jackets
Schirm Schirme m umbrella umbrellas
Drachen Drachen m kite kites
Stock Stöcke m stick sticks throw
Kiste Kisten f box boxes
""")
# tags: static prepositions (dative) and "+<prep>" for motion (accusative)
PLACES = _nouns("place", """
Wiese - f meadow - auf +über
Park - m park - in +durch
Straße - f street - auf +über
Strand - m beach - an +über
Brücke - f bridge - auf +über
Bank - f bench - auf neben
Sofa - n sofa - auf
Tisch - m table - an unter
Haus - n house - vor in +in
Garten - m garden - in +durch
Wald - m forest - in +durch +in
Fluss - m river - an +in
See - m lake - an +in
Berg - m mountain - auf
Feld - n field - auf +über
Markt - m market - auf +über
Bahnhof - m station - vor +in
Küche - f kitchen - in +in
Schnee - m snow - in +durch
Kirche - f church - vor +in
Zaun - m fence - neben hinter
Baum - m tree - unter hinter
Wasser - n water - in +in
Bühne - f stage - auf
""")
STATIC_PREPS = {"auf": "on", "in": "in", "an": "at", "vor": "in front of", "neben": "next to",
                "unter": "under", "hinter": "behind"}
MOTION_PREPS = {"über": "across", "durch": "through", "in": "into"}
CONTRACTIONS = {"in dem": "im", "an dem": "am", "in das": "ins"}


@dataclass(frozen=True)
class Verb:
    de: str
    de_pl: str
    en: str
    en_pl: str
    subjects: frozenset[str]  # noun kinds
    objects: frozenset[str] = frozenset()  # noun kinds or thing tags; empty: intransitive

    def forms(self, plural: bool) -> tuple[str, str]:
        return (self.de_pl, self.en_pl) if plural else (self.de, self.en)


def _verbs(rows: str) -> list[Verb]:
    """One verb a line: ``de de_pl en en_pl subjects [objects]``; lists joined by ``,``."""
    verbs = []
    for row in rows.strip().splitlines():
        de, de_pl, en, en_pl, subjects, *objects = row.split()
        verbs.append(Verb(de, de_pl, en.replace("_", " "), en_pl.replace("_", " "),
                          frozenset(subjects.split(",")), frozenset(",".join(objects).split(",")) - {""}))
    return verbs


ANY = "person,animal"
STATIC_VERBS = _verbs(f"""
schläft schlafen sleeps sleep {ANY}
sitzt sitzen sits sit {ANY}
steht stehen stands stand {ANY}
spielt spielen plays play {ANY}
wartet warten waits wait {ANY}
liegt liegen lies lie {ANY}
tanzt tanzen dances dance person
singt singen sings sing person
lacht lachen laughs laugh person
arbeitet arbeiten works work person
isst essen eats eat person
frisst fressen eats eat animal
""")
MOTION_VERBS = _verbs(f"""
läuft laufen runs run {ANY}
geht gehen walks walk {ANY}
springt springen jumps jump {ANY}
fährt fahren rides ride person
spaziert spazieren strolls stroll person
""")
TRANSITIVE_VERBS = _verbs(f"""
hält halten holds hold person thing
trägt tragen carries carry person thing
wirft werfen throws throw person throw
fängt fangen catches catch {ANY} throw
kauft kaufen buys buy person thing
liest lesen reads read person read
sucht suchen looks_for look_for {ANY} {ANY},thing
beobachtet beobachten watches watch {ANY} {ANY}
sieht sehen sees see {ANY} {ANY},thing
füttert füttern feeds feed person animal
streichelt streicheln pets pet person animal
malt malen paints paint person {ANY},thing
""")

# adjective -> English, by the noun kinds it describes
QUALITIES = {
    "klein": ("small", "person,animal,thing,place"), "groß": ("big", "person,animal,thing,place"),
    "alt": ("old", "person,animal,thing,place"), "schön": ("beautiful", "person,animal,thing,place"),
    "nass": ("wet", "person,animal,thing"), "schmutzig": ("dirty", "person,animal,thing"),
    "jung": ("young", ANY), "müde": ("tired", ANY), "glücklich": ("happy", ANY),
    "fröhlich": ("cheerful", ANY), "hungrig": ("hungry", ANY), "freundlich": ("friendly", ANY),
    "schnell": ("fast", ANY), "neu": ("new", "thing"), "kaputt": ("broken", "thing"),
    "schwer": ("heavy", "thing"), "billig": ("cheap", "thing"),
}
COLOURS = {"rot": "red", "blau": "blue", "grün": "green", "gelb": "yellow", "schwarz": "black",
           "weiß": "white", "braun": "brown", "grau": "gray", "bunt": "colorful"}
COLOURED_KINDS = ("animal", "thing")
NUMBERS = {"zwei": "two", "drei": "three", "vier": "four", "fünf": "five"}

# (determiner kind, gender or "pl") -> case -> German article; "" = no article
ARTICLES = {
    "def": {"m": ("der", "den", "dem"), "f": ("die", "die", "der"), "n": ("das", "das", "dem"),
            "pl": ("die", "die", "den")},
    "indef": {"m": ("ein", "einen", "einem"), "f": ("eine", "eine", "einer"), "n": ("ein", "ein", "einem")},
}
# adjective endings: declension -> gender or "pl" -> (nom, acc, dat)
ENDINGS = {
    "weak": {"m": ("e", "en", "en"), "f": ("e", "e", "en"), "n": ("e", "e", "en"), "pl": ("en", "en", "en")},
    "mixed": {"m": ("er", "en", "en"), "f": ("e", "e", "en"), "n": ("es", "es", "en")},
    "strong": {"pl": ("e", "e", "en")},
}
CASES = ("nom", "acc", "dat")

# what the grammar picks from, computed once
QUALITIES_FOR = {kind: [a for a, (_, kinds) in QUALITIES.items() if kind in kinds.split(",")]
                 for kind in ("person", "animal", "thing", "place")}
OBJECTS_FOR = {verb: [n for n in PEOPLE + ANIMALS + THINGS if n.kind in verb.objects or n.tags & verb.objects]
               for verb in TRANSITIVE_VERBS}
PLACES_FOR = {motion: [(p, preps) for p in PLACES
                       if (preps := sorted(t.lstrip("+") for t in p.tags if t.startswith("+") == motion))]
              for motion in (False, True)}  # motion -> (place, its prepositions)


def inflect(stem: str, ending: str) -> str:
    """Adjective + ending; a stem in -e drops the ending's e (müde + er -> müder)."""
    return stem + (ending[1:] if stem.endswith("e") else ending)


def noun_phrase(noun: Noun, case: str, det: str, adjectives: list[str]) -> tuple[str, str]:
    """German and English of determiner, adjectives, noun; det: "indef", "def", "def_pl" or a number word."""
    plural = det == "def_pl" or det in NUMBERS
    key, c = "pl" if plural else noun.gender, CASES.index(case)
    declension = "strong" if det in NUMBERS else "mixed" if det == "indef" else "weak"
    de = [inflect(a, ENDINGS[declension][key][c]) for a in adjectives] + [noun.form(case, plural)]
    en = [QUALITIES[a][0] if a in QUALITIES else COLOURS[a] for a in adjectives] + [noun.en_pl if plural else noun.en]
    if det in NUMBERS:
        return " ".join([det, *de]), " ".join([NUMBERS[det], *en])
    if det == "indef":
        return " ".join([ARTICLES["indef"][key][c], *de]), " ".join(["an" if en[0][0] in "aeiou" else "a", *en])
    return " ".join([ARTICLES["def"][key][c], *de]), " ".join(["the", *en])


def prepositional_phrase(place: Noun, prep: str, case: str, adjectives: list[str]) -> tuple[str, str]:
    de, en = noun_phrase(place, case, "def", adjectives)
    article, rest = de.split(" ", 1)
    de = f"{prep} {article}"
    english = (MOTION_PREPS if case == "acc" else STATIC_PREPS)[prep]
    return f"{CONTRACTIONS.get(de, de)} {rest}", f"{english} {en}"


class Grammar:
    """Random phrases and sentences; every choice comes from one ``random.Random``."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def adjectives(self, kind: str, p_quality: float = 0.4, p_colour: float = 0.35) -> list[str]:
        chosen = []
        if self.rng.random() < p_quality:
            chosen.append(self.rng.choice(QUALITIES_FOR[kind]))
        if kind in COLOURED_KINDS and self.rng.random() < p_colour:
            chosen.append(self.rng.choice(list(COLOURS)))
        return chosen

    def noun_phrase(self, noun: Noun, case: str) -> tuple[tuple[str, str], bool]:
        """A phrase for noun and whether it is plural."""
        det = self.rng.choices(["indef", "def", "def_pl", *NUMBERS], weights=[10, 4, 2, 1, 1, 1, 1])[0]
        return noun_phrase(noun, case, det, self.adjectives(noun.kind)), det not in ("indef", "def")

    def object_noun(self, verb: Verb) -> Noun:
        return self.rng.choice(OBJECTS_FOR[verb])

    def subject(self, kinds: frozenset[str]) -> tuple[tuple[str, str], bool]:
        """Subject phrase, sometimes with a "mit" phrase or a relative clause."""
        noun = self.rng.choice([n for n in PEOPLE + ANIMALS if n.kind in kinds])
        (de, en), plural = self.noun_phrase(noun, "nom")
        r = self.rng.random()
        if r < 0.15:
            (obj_de, obj_en), _ = self.noun_phrase(self.rng.choice(THINGS), "dat")
            de, en = f"{de} mit {obj_de}", f"{en} with {obj_en}"
        elif r < 0.3:
            verb = self.rng.choice([v for v in TRANSITIVE_VERBS if noun.kind in v.subjects])
            (obj_de, obj_en), _ = self.noun_phrase(self.object_noun(verb), "acc")
            v_de, v_en = verb.forms(plural)
            pronoun = ARTICLES["def"]["pl" if plural else noun.gender][0]  # der, die, das
            english = "who" if noun.kind == "person" else "that"
            de, en = f"{de}, {pronoun} {obj_de} {v_de},", f"{en} {english} {v_en} {obj_en}"
        return (de, en), plural

    def place(self, motion: bool) -> tuple[str, str]:
        place, preps = self.rng.choice(PLACES_FOR[motion])
        prep = self.rng.choice(preps)
        adjectives = self.adjectives("place", p_quality=0.15)
        return prepositional_phrase(place, prep, "acc" if motion else "dat", adjectives)

    def sentence(self) -> tuple[str, str]:
        template = self.rng.choices(["static", "motion", "transitive", "fronted"], weights=[3, 2, 4, 2])[0]
        verb = self.rng.choice({"static": STATIC_VERBS, "motion": MOTION_VERBS, "transitive": TRANSITIVE_VERBS,
                                "fronted": STATIC_VERBS + TRANSITIVE_VERBS}[template])
        if template == "fronted":  # V2: "Im Park spielen zwei Kinder." -> "Two children play in the park."
            noun = self.rng.choice([n for n in PEOPLE + ANIMALS if n.kind in verb.subjects])
            (s_de, s_en), plural = self.noun_phrase(noun, "nom")
            p_de, p_en = self.place(motion=False)
            v_de, v_en = verb.forms(plural)
            de, en = f"{p_de} {v_de} {s_de}", f"{s_en} {v_en}"
            if verb.objects:
                (o_de, o_en), _ = self.noun_phrase(self.object_noun(verb), "acc")
                de, en = f"{de} {o_de}", f"{en} {o_en}"
            en = f"{en} {p_en}"
        else:
            (s_de, s_en), plural = self.subject(verb.subjects)
            v_de, v_en = verb.forms(plural)
            de, en = f"{s_de} {v_de}", f"{s_en} {v_en}"
            if template == "transitive":  # the place goes before the object in German: "liest auf der Bank ein Buch"
                (o_de, o_en), _ = self.noun_phrase(self.object_noun(verb), "acc")
                p_de, p_en = self.place(motion=False) if self.rng.random() < 0.4 else ("", "")
                de, en = " ".join(filter(None, [de, p_de, o_de])), " ".join(filter(None, [en, o_en, p_en]))
            elif template == "motion" or self.rng.random() < 0.7:
                p_de, p_en = self.place(motion=template == "motion")
                de, en = f"{de} {p_de}", f"{en} {p_en}"
        return capitalise(de) + ".", capitalise(en) + "."


def capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def generate_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """n distinct (German, English) sentence pairs, the same for the same (n, seed)."""
    grammar, pairs = Grammar(seed), {}
    for _ in range(20 * n + 100):  # far more tries than needed: the grammar has millions of sentences
        if len(pairs) == n:
            break
        de, en = grammar.sentence()
        pairs.setdefault(de, en)
    if len(pairs) < n:
        raise ValueError(f"the grammar gave only {len(pairs)} distinct sentences of the {n} asked for")
    return list(pairs.items())


def write_default_corpus(out_dir: str | Path, n_train: int = 6000, n_valid: int = 300, n_test: int = 300,
                         seed: int = 1234) -> Path:
    """Write train/valid/test.{de,en} (no German sentence in two splits) into out_dir; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = generate_pairs(n_train + n_valid + n_test, seed)
    bounds = [0, n_train, n_train + n_valid, n_train + n_valid + n_test]
    for split, start, end in zip(SPLITS, bounds, bounds[1:]):
        write_lines(out_dir / f"{split}.de", [de for de, _ in pairs[start:end]])
        write_lines(out_dir / f"{split}.en", [en for _, en in pairs[start:end]])
    return out_dir
