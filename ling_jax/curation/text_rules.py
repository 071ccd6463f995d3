"""Rules for code-related text (paper section 2.2.1): no line-length limits; image references, links and
template placeholders drop a sample; garbled characters, repetition and PII as for code.
"""

from __future__ import annotations

import dataclasses
import re

from ling_jax.curation.records import Reason, Record
from ling_jax.curation.rules import alnum_fraction, pii_fraction, shared_checks
from ling_jax.curation.settings import bounded

_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)|<img\b|\[image[:\]]|\b[\w/.-]+\.(?:png|jpe?g|gif|svg|bmp|webp)\b",
                    re.IGNORECASE)
_LINK = re.compile(r"\b(?:https?|ftp)://\S+|\bwww\.\S+|\[[^\]]+\]\([^)]+\)|<a\s+href", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{\{[^{}]*\}\}|\$\{[^{}]*\}|\{%[^%]*%\}|<\s*(?:insert|your|placeholder)[^>]*>|"
                          r"\[(?:insert|your|placeholder)[^\]]*\]|\bPLACEHOLDER\b|\bLorem ipsum\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class TextRules:
    """The thresholds of the code-related-text rules (config section `text_rules`)."""

    drop_images: bool = bounded(True)  # Drop samples with image references (markdown, <img>, image files).
    drop_links: bool = bounded(True)  # Drop samples with links (URLs, markdown links, <a href>).
    drop_placeholders: bool = bounded(True)  # Drop samples with template placeholders ({{x}}, ${x}, [INSERT]).
    min_chars: int = bounded(1, 0)  # Drop shorter samples.
    min_alnum_fraction: float = bounded(0.25, 0.0, 1.0)  # Drop samples with fewer alphanumerics.
    max_pii_fraction: float = bounded(0.5, 0.0, 1.0)  # E-mails / phones / date-times over this drop.
    max_garbled_fraction: float = bounded(0.01, 0.0, 1.0)  # Garbled characters over this drop.
    max_line_repetition: float = bounded(0.7, 0.0, 1.0)  # Repeated lines over this fraction drop.
    max_word_repetition: float = bounded(0.7, 0.0, 1.0)  # Repeated word 5-grams over this fraction drop.


def has_image(text: str) -> bool:
    """Whether `text` references an image."""
    return bool(_IMAGE.search(text))


def has_link(text: str) -> bool:
    """Whether `text` holds a link."""
    return bool(_LINK.search(text))


def has_placeholder(text: str) -> bool:
    """Whether `text` holds a template placeholder."""
    return bool(_PLACEHOLDER.search(text))


def check_text(rec: Record, rules: TextRules) -> Reason | None:
    """The first code-related-text rule `rec` breaks, or None."""
    text = rec["text"]
    if len(text.strip()) < max(rules.min_chars, 1):
        return Reason.EMPTY
    if rules.drop_images and has_image(text):
        return Reason.IMAGE_REFERENCE
    if rules.drop_links and has_link(text):
        return Reason.LINK
    if rules.drop_placeholders and has_placeholder(text):
        return Reason.PLACEHOLDER
    if alnum_fraction(text) < rules.min_alnum_fraction:
        return Reason.ALNUM_FRACTION
    if pii_fraction(text, rules.max_pii_fraction) > rules.max_pii_fraction:
        return Reason.PII
    return shared_checks(text, rules.max_garbled_fraction, rules.max_line_repetition, rules.max_word_repetition)
