"""Capability scores of generated answers: math answers (GSM8K's '#### N' and the last number), and the
open task's checklist (the share of an item's key points an answer covers)."""
import re
import unicodedata


STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(s):
    """'$1,234.00' -> '1234'; None when nothing numeric is left."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else repr(v)


def extract_strict(text):
    m = STRICT.search(text)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(text):
    """The last number in the text (lm-evaluation-harness 'flexible-extract')."""
    found = [a or b for a, b in FLEXIBLE.findall(text)]
    for cand in reversed(found):
        v = normalize_number(cand)
        if v is not None:
            return v
    return None


def normalize_text(text):
    """Lower case, ASCII, apostrophes dropped ("don't" -> "dont"), every other non-alphanumeric run a
    single space, padded with spaces: ' two factor authentication '."""
    text = text.replace("\u2019", "'").replace("'", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text).split()) + " "


def covers(answer, phrases):
    """True when any phrase occurs in the answer at the start of a word, with any ending:
    'encrypt' matches 'encryption', 'salt' does not match 'basalt', 'two-factor' matches 'two factor'."""
    a = normalize_text(answer)
    return any(" " + normalize_text(p).strip() in a for p in phrases if normalize_text(p).strip())


def checklist_score(answer, key_points):
    """Share of key points (each a list of alternative phrases) that the answer covers."""
    return sum(covers(answer, phrases) for phrases in key_points) / len(key_points)
