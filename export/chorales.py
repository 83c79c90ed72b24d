"""Bach's chorales as ids without text: the soprano line of each, note by note, from music21's corpus.

The four-part chorales of Riemenschneider's numbering (371 numbers, 350 distinct files) ship inside
the `music21` package from PyPI, so they are read offline. Each chorale becomes its soprano's notes
with ties merged, one id per note: its MIDI pitch, or a rest; an end id closes each chorale, and the
model learns to predict the next note. The split is by chorale, the corpus's rule: sorted by name,
every 10th held out. Parsing takes a minute or two, so the ids are cached beside the text corpus, per music21 version.
"""

from __future__ import annotations

import json

import numpy as np

from rnnserve.export.corpus import VALIDATION_EVERY, default_cache_dir
from rnnserve.export.datasets import TokenData

END = 0            # closes a chorale (and so opens the next)
REST = 1
FIRST_PITCH = 2    # id of MIDI pitch p is FIRST_PITCH + p
VOCAB_SIZE = FIRST_PITCH + 128


def note_names() -> list[str]:
    """A readable name per id, for the bundle's documentation and for people reading predictions."""
    from music21 import pitch

    return ["<end>", "rest", *(pitch.Pitch(midi=p).nameWithOctave for p in range(128))]


def soprano_ids(score) -> list[int]:
    """One chorale's soprano line as ids (chords, rare in a soprano, count as their top note)."""
    ids = []
    for element in score.parts[0].stripTies().flatten().notesAndRests:
        if element.isRest:
            ids.append(REST)
        elif element.isChord:
            ids.append(FIRST_PITCH + max(p.midi for p in element.pitches))
        else:
            ids.append(FIRST_PITCH + element.pitch.midi)
    return ids


def read_chorales() -> dict[str, list[int]]:
    """Every chorale's soprano ids by corpus name, parsed once per music21 version and cached."""
    import music21
    from music21 import corpus

    cache = default_cache_dir() / f"bach-chorales-soprano-music21-{music21.__version__}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    chorales = {name: soprano_ids(corpus.parse(name))
                for name in corpus.chorales.Iterator(returnType="filename")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(chorales))
    return chorales


def load_chorales() -> TokenData:
    import music21

    chorales = read_chorales()
    names = sorted(chorales)
    held = [n for i, n in enumerate(names) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]

    def joined(selected: list[str]) -> np.ndarray:
        return np.asarray([i for n in selected for i in (*chorales[n], END)], dtype=np.int64)

    train, val = joined([n for n in names if n not in held]), joined(held)
    description = {"name": "bach-chorales", "source": f"music21 {music21.__version__} corpus, "
                   "corpus.chorales.Iterator (Riemenschneider)", "sequence": "soprano notes, ties merged",
                   "ids": f"{END} end of chorale, {REST} rest, {FIRST_PITCH} + MIDI pitch",
                   "files": len(names), "validation_files": held,
                   "split": f"sorted by name, every {VALIDATION_EVERY}th chorale held out",
                   "train_tokens": len(train), "val_tokens": len(val)}
    return TokenData(train, val, VOCAB_SIZE, {"kind": "ids", "size": VOCAB_SIZE, "names": note_names()},
                     description, None)
