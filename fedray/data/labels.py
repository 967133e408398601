"""Canonical class names and the exact folder names each known layout uses for them.

Folder names are matched whole (case-insensitive, surrounding spaces ignored), never by
substring: "pre" is inside "early pre-b", and a substring rule would merge two subtypes.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("Benign", "Early", "Pre", "Pro")
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

# Every folder name that denotes a class, in any layout we recognise.
FOLDER_ALIASES: dict[str, str] = {
    # Kaggle "ALL (Acute Lymphoblastic Leukemia) Images": Original/ and Segmented/
    "benign": "Benign",
    "early": "Early",
    "pre": "Pre",
    "pro": "Pro",
    # Kaggle "Blood cell Cancer [ALL]"
    "[malignant] early pre-b": "Early",
    "[malignant] pre-b": "Pre",
    "[malignant] pro-b": "Pro",
    # Plain spellings of the same subtypes
    "early pre-b": "Early",
    "pre-b": "Pre",
    "pro-b": "Pro",
}


def canonical_class(folder_name: str) -> str | None:
    """The canonical class a folder denotes, or None when the name is not a known class."""
    return FOLDER_ALIASES.get(folder_name.strip().lower())
