"""Slicer terminology entry strings from a model card class's SNOMED codes, and back."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from .errors import BridgeError


#: terminology context names Slicer uses for DICOM codes (category/type, anatomic region)
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"


ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def _code(triplet) -> str:
    if not triplet:
        return "^^"
    scheme, value, meaning = (list(triplet) + ["", "", ""])[:3]
    for part in (scheme, value, meaning):
        if any(ch in str(part) for ch in "~^|"):
            raise BridgeError(f"terminology code {triplet!r} contains a reserved character (~ ^ |)")
    return f"{scheme}^{value}^{meaning}"


def terminology_entry(terminology: Optional[Mapping[str, Any]]) -> str:
    """Slicer terminology entry string of a model-card terminology
    ``{"category": [scheme, value, meaning], "type": …, "type_modifier": …,
    "anatomic_region": …, "anatomic_region_modifier": …}``:
    ``context~category~type~typeModifier~regionContext~region~regionModifier``, each
    code as ``scheme^value^meaning`` (empty codes ``^^``). Empty string when the card
    has no category/type."""
    if not terminology or not terminology.get("category") or not terminology.get("type"):
        return ""
    t = terminology
    return "~".join([
        t.get("context", TERMINOLOGY_CONTEXT), _code(t["category"]), _code(t["type"]),
        _code(t.get("type_modifier")), t.get("anatomic_context", ANATOMIC_CONTEXT),
        _code(t.get("anatomic_region")), _code(t.get("anatomic_region_modifier"))])


def parse_terminology_entry(entry: str) -> Dict[str, Any]:
    """The inverse of :func:`terminology_entry` (for reading segments back)."""
    parts = (entry or "").split("~")
    if len(parts) != 7:
        return {}
    def code(s):
        c = s.split("^")
        return c if len(c) == 3 and any(c) else None
    out = {"context": parts[0], "category": code(parts[1]), "type": code(parts[2]),
           "type_modifier": code(parts[3]), "anatomic_context": parts[4],
           "anatomic_region": code(parts[5]), "anatomic_region_modifier": code(parts[6])}
    return {k: v for k, v in out.items() if v}
