"""Prompt filter: normalisation, word boundaries, phrases, tenant and locale lists."""

from __future__ import annotations

import pytest

from factory.safety.prompts import PromptFilter, PromptVerdict, fold, locale_chain


def blocked(flt: PromptFilter, prompt: str, **where: str) -> bool:
    return flt.check(prompt, **where).blocked


@pytest.fixture
def flt() -> PromptFilter:
    return PromptFilter(
        ["nude", "ass", "nude photo", "x-rated", "裸体"],
        tenant_terms={"acme": ["rival brand"], "globex": ["widget"]},
        locale_terms={"de": ["nackt"], "fr-FR": ["zut alors"], "fr": ["merde"]},
    )


def test_fold_handles_width_case_accents_and_invisible_characters() -> None:
    assert fold("ｎｕｄｅ") == fold("NUDE") == fold("nüde") == fold("Nu\u200bdé") == "nude"
    assert fold("STRASSE") == fold("straße")  # casefold, not lower()


@pytest.mark.parametrize(
    "prompt",
    ["nude", "NUDE portrait", "a Nüde figure", "ｎｕｄｅ", "ＮＵＤＥ", "nu\u00adde", "nude_pic", "semi-nude",
     "(nude)"],
)
def test_variants_of_a_term_are_caught(flt: PromptFilter, prompt: str) -> None:
    verdict = flt.check(prompt)
    assert verdict.blocked
    assert verdict.matched_terms == ("nude",)
    assert verdict.matched_lists == ("global",)


@pytest.mark.parametrize(
    "prompt", ["a class photo", "my assistant", "passage", "bass guitar", "nudes2", "a denuded hill", ""]
)
def test_words_containing_a_term_are_not_caught(flt: PromptFilter, prompt: str) -> None:
    assert not blocked(flt, prompt)


def test_word_boundaries_still_catch_the_word_itself(flt: PromptFilter) -> None:
    assert flt.check("kick ASS!").matched_terms == ("ass",)
    assert flt.check("class ass assistant").matched_terms == ("ass",)


def test_multi_word_terms_match_as_phrases_with_flexible_whitespace(flt: PromptFilter) -> None:
    for prompt in ["nude photo", "NUDE\n\t  Photo", "nude-photo", "nude\u3000photo"]:
        assert flt.check(prompt).matched_terms == ("nude photo",), prompt
    only_word = PromptFilter(["kill it"])
    assert not only_word.check("kill items").blocked
    assert not only_word.check("killit").blocked
    assert only_word.check("Kill   It now").blocked
    # A term written with a hyphen matches the spaced spelling too.
    assert flt.check("an X rated film").matched_terms == ("x-rated",)


def test_scripts_without_spaces_match_inside_words(flt: PromptFilter) -> None:
    assert flt.check("我的裸体照片").matched_terms == ("裸体",)


def test_tenant_lists_apply_only_to_their_tenant(flt: PromptFilter) -> None:
    verdict = flt.check("a poster of the Rival  Brand", tenant="acme")
    assert verdict.blocked and verdict.matched_lists == ("tenant:acme",)
    assert not blocked(flt, "a poster of the rival brand", tenant="globex")
    assert not blocked(flt, "a poster of the rival brand")
    assert blocked(flt, "a widget", tenant="globex")
    assert not blocked(flt, "a widget", tenant="acme")
    assert blocked(flt, "nude", tenant="unknown-tenant")  # global list still applies


def test_locale_lists_apply_to_the_locale_and_its_children(flt: PromptFilter) -> None:
    assert blocked(flt, "nackt", locale="de")
    assert blocked(flt, "NACKT", locale="de-AT")
    assert not blocked(flt, "nackt", locale="fr")
    assert not blocked(flt, "nackt")
    # fr-FR requests see the fr-FR list and the fr list; plain fr and fr-CA do not see fr-FR's.
    assert flt.check("Zut alors", locale="fr-FR").matched_lists == ("locale:fr-fr",)
    assert flt.check("merde", locale="fr-FR").matched_lists == ("locale:fr",)
    assert blocked(flt, "zut alors", locale="fr_fr")
    assert not blocked(flt, "zut alors", locale="fr")
    assert not blocked(flt, "zut alors", locale="fr-CA")
    assert blocked(flt, "merde", locale="fr-CA")


def test_every_matched_term_and_list_is_reported() -> None:
    flt = PromptFilter(["nude"], tenant_terms={"acme": ["nude", "gore"]}, locale_terms={"de": ["nackt"]})
    verdict = flt.check("nude gore nackt", tenant="acme", locale="de-DE")
    assert set(verdict.matched_terms) == {"nude", "gore", "nackt"}
    assert set(verdict.matched_lists) == {"global", "tenant:acme", "locale:de"}
    assert verdict.reason is not None and "'gore'" in verdict.reason and "tenant:acme" in verdict.reason


def test_missing_prompts_and_empty_terms_do_not_block() -> None:
    flt = PromptFilter(["", "   ", "nude"])
    assert flt.check_many([None, "", "   ", "a cat"]) == [PromptVerdict(blocked=False)] * 4
    assert flt.check("nude").blocked
    assert flt.check("a cat").reason is None


def test_a_bare_string_is_not_a_term_list() -> None:
    with pytest.raises(TypeError):
        PromptFilter("nude")  # type: ignore[arg-type]


def test_check_many_matches_check_and_validates_lengths(flt: PromptFilter) -> None:
    prompts = ["nude", "widget", "nackt", "a cat", None]
    tenants = [None, "globex", None, "acme", "acme"]
    locales = ["fr", None, "de", None, "de"]
    batch = flt.check_many(prompts, tenants, locales)
    assert [verdict.blocked for verdict in batch] == [True, True, True, False, False]
    assert batch == [flt.check(p, t, loc) for p, t, loc in zip(prompts, tenants, locales, strict=True)]
    with pytest.raises(ValueError):
        flt.check_many(["a", "b"], tenants=["acme"])


def test_regexes_are_compiled_once_per_list_combination(flt: PromptFilter) -> None:
    flt.check("x", tenant="acme", locale="fr-FR")
    compiled = flt._matchers[("acme", ("fr-fr", "fr"))]
    flt.check("y", tenant="acme", locale="FR_fr")
    assert flt._matchers[("acme", ("fr-fr", "fr"))] is compiled
    # Tenants and locales without lists share the global-only matcher: requests cannot grow the cache.
    for i in range(50):
        flt.check("z", tenant=f"tenant-{i}", locale=f"xx-{i}")
    assert set(flt._matchers) == {("acme", ("fr-fr", "fr")), (None, ())}
    assert PromptFilter(["nude"])._matchers == {}  # instances share nothing


def test_locale_chain() -> None:
    assert locale_chain("zh-Hant-TW") == ["zh-hant-tw", "zh-hant", "zh"]
    assert locale_chain("fr_FR") == ["fr-fr", "fr"]
    assert locale_chain(None) == [] and locale_chain(" ") == []
