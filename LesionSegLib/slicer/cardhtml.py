"""A model card as HTML, for the module panel and the effects' "Model card" button
(presentation, so it is not part of the logic)."""
from __future__ import annotations

from typing import Optional


def model_card_html(model: str, preset: Optional[str] = None) -> str:
    """What the network is, what it segments, what input it expects, what was
    reconstructed, and where it came from."""
    from .logic import LesionSegLogic

    import html
    c = LesionSegLogic.modelCard(model, preset)
    p = c["preset"]
    e = html.escape
    paper = c.get("paper", {})
    rows = [f"<h3>{e(c['display_name'])} — {e(p['name'])}</h3>", f"<p><i>{e(c.get('title', ''))}</i></p>"]
    if paper:
        cite = ", ".join(str(x) for x in (paper.get("authors"), paper.get("venue"), paper.get("year")) if x)
        if paper.get("doi"):
            cite += f", doi:{paper['doi']}"
        rows.append(f"<p>{e(cite)}</p>")
    rows.append(f"<p>{e(c.get('summary', ''))}</p>")
    rows.append(f"<p><b>Task:</b> {e(p.get('description', ''))}<br><b>Modality:</b> {e(str(p.get('modality', '')))}</p>")
    inp = c["input"]
    rows.append(f"<p><b>Input:</b> {inp.get('dims', 2)}D slices, {inp['channels']} channel(s), "
                f"{e(str(inp.get('normalization', {}).get('kind', '')))} normalisation"
                + (f", window C {inp['window']['center']} / W {inp['window']['width']}" if inp.get("window") else "")
                + "</p>")
    classes = ", ".join(f"<span style='color:rgb({','.join(str(v) for v in k.get('color', [0, 0, 0]))})'>&#9632;</span> "
                        f"{e(k['name'])}" for k in c["classes"])
    out = c["outputs"]
    rows.append(f"<p><b>Segments:</b> {classes} ({e(out['activation'])}, threshold {out.get('threshold', 0.5)}"
                + (", classes may overlap" if out.get("multi_label") else "") + ")</p>")
    rec = c.get("reconstructed") or []
    if rec:
        rows.append("<p><b>Reconstructed (not from official code):</b></p><ul>"
                    + "".join(f"<li>{e(r.get('part', ''))}: {e(r.get('reason', ''))}</li>" for r in rec) + "</ul>")
    pre = c.get("pretrained", {})
    if pre.get("official_checkpoint"):
        rows.append(f"<p><b>Official weights:</b> {e(pre['official_checkpoint'])}</p>")
    return "\n".join(rows)
