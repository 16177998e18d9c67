"""What the reliability tests count — fuzz cases per target, kills sent, reruns equal to an uninterrupted run,
hostile model dirs refused — printed after the test run (conftest's terminal summary) for the README's Reliability
section."""
from collections import Counter

FIGURES: Counter = Counter()


def tally(name: str, count: int = 1) -> None:
    FIGURES[name] += count
