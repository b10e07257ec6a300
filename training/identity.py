# The identity a fine-tune gives the model (name, underlying model, organisation), validated in one place.
# Library module, no CLI; try it with:
#   python -c "from training.identity import IdentitySpec; print(IdentitySpec('UbUb'))"
# Every tool that fills the name into text (data generation, evaluation, the model card) takes an
# IdentitySpec, so a bad name is rejected once, before any work is done, with a message saying what is wrong.
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

Lang = Literal["zh", "en"]

MAX_NAME_CHARS = 40
MAX_FIELD_CHARS = 200
# Chat-template control tokens of InternLM2 (and of the tiny models): text containing them would let the
# training data open or close turns by itself.
SPECIAL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<s>", "</s>")
JOINERS = "\u200c\u200d"  # zero-width non-joiner and joiner
# "中文 / English" inside a field gives each language its own wording (see IdentitySpec.localised).
LANG_SEPARATOR = " / "


class IdentityError(ValueError):
    """The identity (name, model description or organisation) cannot be used."""


def _invisible(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf")


def _visible(ch: str) -> bool:
    return not ch.isspace() and not _invisible(ch)


def _check_text(field: str, value: object, max_chars: int) -> str:
    if not isinstance(value, str):
        raise IdentityError(f"{field} must be text, got {type(value).__name__}")
    # NFC: "José" typed with a combining accent (macOS file names, some keyboards) is the same name as the
    # precomposed one, in the data, the evaluation and the work dir.
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        raise IdentityError(f"{field} is empty: give a non-blank {field}")
    if len(text) > max_chars:
        raise IdentityError(
            f"{field} is {len(text)} characters long; at most {max_chars} are allowed: "
            + (repr(text) if len(text) <= 60 else f"{text[:60]!r}…")
        )
    # Cc = control characters (newline, tab, escape...), Cf = invisible format characters (zero-width...),
    # but for a joiner between two visible characters: it is part of Persian words and of emoji (👩‍💻).
    bad = sorted({ch for i, ch in enumerate(text) if _invisible(ch) and not (
        ch in JOINERS and 0 < i < len(text) - 1 and _visible(text[i - 1]) and _visible(text[i + 1]))})
    if bad:
        codes = ", ".join(f"U+{ord(ch):04X}" for ch in bad)
        raise IdentityError(f"{field} contains control or invisible characters ({codes}): {text!r}")
    tokens = [tok for tok in SPECIAL_TOKENS if tok in text]
    if tokens:
        raise IdentityError(
            f"{field} contains chat special tokens {tokens}, which would break the chat format"
        )
    return text


def mentions(text: str, word: str) -> bool:
    """Whether ``text`` mentions ``word`` (ignoring case) as a word of its own: not inside a longer Latin word
    or number ("Ed" is not in "developed"); a Chinese name has no such edges ("我是小明的").

    Args:
        text: e.g. a model's answer.
        word: e.g. the assistant's name.
    """
    latin = "[a-z0-9]"  # (casefolded) beside a name starting or ending with one, it makes a longer word
    head = latin if re.match(latin, word[:1].casefold()) else "(?!)"
    tail = latin if re.match(latin, word[-1:].casefold()) else "(?!)"
    pattern = rf"(?<!{head}){re.escape(unicodedata.normalize('NFC', word).casefold())}(?!{tail})"
    return re.search(pattern, unicodedata.normalize("NFC", text).casefold()) is not None


@dataclass(frozen=True)
class IdentitySpec:
    """Who the fine-tuned assistant says it is.

    Args:
        name: the new name filled into every identity answer (1..40 characters, surrounding spaces dropped).
        model_desc: the underlying model the answers mention; "中文 / English" gives per-language wording.
        organisation: who built the underlying model; "中文 / English" gives per-language wording.
    """

    name: str
    model_desc: str = "书生·浦语 InternLM2.5-1.8B / InternLM2.5-1.8B"
    organisation: str = "上海AI实验室 / Shanghai AI Laboratory"

    def __post_init__(self) -> None:
        # Normalised in place (frozen dataclass) so that every consumer sees the same stripped text.
        object.__setattr__(self, "name", _check_text("name", self.name, MAX_NAME_CHARS))
        object.__setattr__(self, "model_desc", _check_text("model_desc", self.model_desc, MAX_FIELD_CHARS))
        object.__setattr__(
            self, "organisation", _check_text("organisation", self.organisation, MAX_FIELD_CHARS)
        )
        for field in ("model_desc", "organisation"):
            value = getattr(self, field)
            padded = f" {value} "  # stripping made "中文 / " into "中文 /"; padding finds the separator
            if LANG_SEPARATOR in padded and not all(part.strip() for part in padded.split(LANG_SEPARATOR, 1)):
                raise IdentityError(f"{field} {value!r} has an empty side around {LANG_SEPARATOR.strip()!r}")
            # An identity answer must state the name and the model: one inside the other cannot be told apart.
            if mentions(value, self.name) or mentions(self.name, self.localised(value, "en")):
                raise IdentityError(f"name {self.name!r} is part of what the answers say the model is "
                                    f"({value!r}): choose a name of its own")

    @staticmethod
    def localised(text: str, lang: Lang) -> str:
        """The zh or en wording of a field written as "中文 / English" (the whole text when it has no " / ").

        Args:
            text: a field value such as IdentitySpec.organisation.
            lang: "zh" for the part before the separator, "en" for the part after it.
        """
        if LANG_SEPARATOR not in text:
            return text
        zh, en = text.split(LANG_SEPARATOR, 1)
        return (zh if lang == "zh" else en).strip()

    @property
    def model_id(self) -> str:
        """The model's plain name (the English wording of model_desc): an identity answer must state it."""
        return self.localised(self.model_desc, "en")

    def fields(self, lang: Lang) -> dict[str, str]:
        """Values for the answer templates' {name}, {model} and {org} in one language.

        Args:
            lang: "zh" or "en".
        """
        return {
            "name": self.name,
            "model": self.localised(self.model_desc, lang),
            "org": self.localised(self.organisation, lang),
        }
