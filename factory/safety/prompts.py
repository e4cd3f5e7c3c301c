"""Prompt filter: block prompts that contain listed terms.

Term lists come in three scopes: global, per tenant and per locale. A request sees the global list, its
tenant's list and the lists of its locale and that locale's parents ("fr-FR" sees "fr-FR" and "fr").

Matching works on a folded form of both term and prompt, so that trivial spellings do not slip through:
NFKC (full-width and compatibility forms become plain letters), invisible format characters (zero-width
space, soft hyphen) removed, casefold, then accents stripped (NFKD, combining marks dropped). "ｎｕｄｅ",
"NUDE" and "nüde" all fold to "nude".

Terms match whole words: a term end that is a letter or digit must not touch another letter or digit, so
"ass" matches neither "class" nor "assistant", while "nude_pic" and "nude-pic" do match "nude" (underscore
and hyphen separate words here, unlike regex `\\b`). Scripts written without spaces (Han, kana, Thai, ...)
have no word boundaries to use, so term ends in those scripts match anywhere. Words of a multi-word term
match across any run of whitespace, hyphens or underscores.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

import structlog
from pydantic import BaseModel, ConfigDict, Field

log = structlog.get_logger(__name__)

GLOBAL_LIST = "global"

# Letters/digits of scripts that do not separate words with spaces, by Unicode character-name prefix.
_UNSPACED_SCRIPTS = (
    "CJK",
    "HIRAGANA",
    "KATAKANA",
    "THAI",
    "LAO",
    "KHMER",
    "MYANMAR",
    "TIBETAN",
    "IDEOGRAPHIC",
)
_WORD_SEPARATOR = r"(?:[\s_\-\u2010-\u2015])+"
_NOT_AFTER_WORD_CHAR = r"(?<![^\W_])"
_NOT_BEFORE_WORD_CHAR = r"(?![^\W_])"


def fold(text: str) -> str:
    """The comparison form of `text` (see module docstring); applied to terms and prompts alike."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf").casefold()
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def normalize_locale(locale: str) -> str:
    """'fr_FR' and 'FR-fr' are the same locale: lower case, hyphen-separated."""
    return locale.strip().replace("_", "-").casefold()


def locale_chain(locale: str | None) -> list[str]:
    """A locale and its parents, most specific first: 'zh-Hant-TW' -> ['zh-hant-tw', 'zh-hant', 'zh']."""
    if not locale or not locale.strip():
        return []
    parts = [part for part in normalize_locale(locale).split("-") if part]
    return ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _needs_boundary(ch: str) -> bool:
    if not ch.isalnum():
        return False
    return not unicodedata.name(ch, "").startswith(_UNSPACED_SCRIPTS)


def _term_key(folded: str) -> str:
    # "x-rated", "x rated" and "x_rated" are one term: its words, single-spaced.
    return " ".join(word for word in re.split(_WORD_SEPARATOR, folded.strip()) if word)


def _term_pattern(key: str) -> str:
    body = _WORD_SEPARATOR.join(re.escape(word) for word in key.split(" "))
    head = _NOT_AFTER_WORD_CHAR if _needs_boundary(key[0]) else ""
    tail = _NOT_BEFORE_WORD_CHAR if _needs_boundary(key[-1]) else ""
    return f"{head}{body}{tail}"


class PromptVerdict(BaseModel):
    """The filter's answer for one prompt."""

    model_config = ConfigDict(frozen=True)

    blocked: bool = Field(description="True when a listed term matched")
    matched_terms: tuple[str, ...] = Field(default=(), description="Terms that matched, as written in lists")
    matched_lists: tuple[str, ...] = Field(
        default=(),
        description="Lists that caused the block: 'global', 'tenant:<id>' or 'locale:<tag>'",
    )

    @property
    def reason(self) -> str | None:
        """One human-readable line, or None when the prompt passed."""
        if not self.blocked:
            return None
        terms = ", ".join(repr(term) for term in self.matched_terms)
        plural = "s" if len(self.matched_lists) > 1 else ""
        return f"prompt filter: {terms} on {', '.join(self.matched_lists)} list{plural}"


PASS = PromptVerdict(blocked=False)


class _Matcher:
    """One compiled alternation for a set of lists, and the way back from a match to terms and lists."""

    def __init__(self, lists: Sequence[tuple[str, Mapping[str, str]]]) -> None:
        # key (folded, single-spaced) -> (first spelling seen, names of lists holding it)
        self.terms: dict[str, tuple[str, list[str]]] = {}
        for list_name, terms in lists:
            for key, original in terms.items():
                entry = self.terms.setdefault(key, (original, []))
                if list_name not in entry[1]:
                    entry[1].append(list_name)
        # Longest first so a phrase wins over a single word it starts with. Each term gets its own named
        # group, so a match leads straight back to its term whatever separators the prompt used.
        self.keys = sorted(self.terms, key=len, reverse=True)
        alternatives = (f"(?P<t{i}>{_term_pattern(key)})" for i, key in enumerate(self.keys))
        self.regex = re.compile("|".join(alternatives)) if self.keys else None

    def match(self, folded_prompt: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if self.regex is None:
            return (), ()
        terms: list[str] = []
        lists: list[str] = []
        for hit in self.regex.finditer(folded_prompt):
            assert hit.lastgroup is not None
            original, names = self.terms[self.keys[int(hit.lastgroup[1:])]]
            if original not in terms:
                terms.append(original)
            lists.extend(name for name in names if name not in lists)
        return tuple(terms), tuple(lists)


class PromptFilter:
    """Term lists: global, per tenant and per locale.

    Regexes are compiled once per distinct combination of lists a request can see and kept on the
    instance; the cache key is built from the lists that exist, so unknown tenants or locales from requests
    cannot grow it without bound.
    """

    def __init__(
        self,
        global_terms: Iterable[str] = (),
        tenant_terms: Mapping[str, Iterable[str]] | None = None,
        locale_terms: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self._global = self._fold_terms(global_terms)
        self._tenants = {tenant: self._fold_terms(terms) for tenant, terms in (tenant_terms or {}).items()}
        self._locales: dict[str, dict[str, str]] = {}
        for locale, terms in (locale_terms or {}).items():
            # "fr_FR" and "fr-FR" in one config are one list.
            self._locales.setdefault(normalize_locale(locale), {}).update(self._fold_terms(terms))
        self._matchers: dict[tuple[str | None, tuple[str, ...]], _Matcher] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _fold_terms(terms: Iterable[str]) -> dict[str, str]:
        if isinstance(terms, str):  # a bare string would silently become a list of letters
            raise TypeError("term lists must be lists of strings, not a single string")
        folded: dict[str, str] = {}
        for term in terms:
            key = _term_key(fold(term))
            # An empty term would match every prompt.
            if key:
                folded.setdefault(key, term.strip())
        return folded

    def _matcher(self, tenant: str | None, locale: str | None) -> _Matcher:
        tenant_key = tenant if tenant in self._tenants else None
        locale_keys = tuple(tag for tag in locale_chain(locale) if tag in self._locales)
        cache_key = (tenant_key, locale_keys)
        matcher = self._matchers.get(cache_key)
        if matcher is None:
            lists: list[tuple[str, Mapping[str, str]]] = [(GLOBAL_LIST, self._global)]
            if tenant_key is not None:
                lists.append((f"tenant:{tenant_key}", self._tenants[tenant_key]))
            lists.extend((f"locale:{tag}", self._locales[tag]) for tag in locale_keys)
            matcher = _Matcher(lists)
            with self._lock:
                matcher = self._matchers.setdefault(cache_key, matcher)
        return matcher

    def check(self, prompt: str | None, tenant: str | None = None, locale: str | None = None) -> PromptVerdict:
        """Check one prompt; a missing or empty prompt passes (caption rows have none)."""
        return self.check_many([prompt], [tenant], [locale])[0]

    def check_many(
        self,
        prompts: Sequence[str | None],
        tenants: Sequence[str | None] | None = None,
        locales: Sequence[str | None] | None = None,
    ) -> list[PromptVerdict]:
        """Check a batch; `tenants`/`locales` are parallel to `prompts` (None: no tenant/locale lists)."""
        count = len(prompts)
        tenants = list(tenants) if tenants is not None else [None] * count
        locales = list(locales) if locales is not None else [None] * count
        if len(tenants) != count or len(locales) != count:
            raise ValueError(f"got {count} prompts, {len(tenants)} tenants and {len(locales)} locales")

        verdicts: list[PromptVerdict] = []
        for prompt, tenant, locale in zip(prompts, tenants, locales, strict=True):
            if not prompt or not prompt.strip():
                verdicts.append(PASS)
                continue
            terms, lists = self._matcher(tenant, locale).match(fold(prompt))
            verdicts.append(PromptVerdict(blocked=bool(terms), matched_terms=terms, matched_lists=lists))
        return verdicts
