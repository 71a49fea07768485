"""The reviewed-results report as a PDF: what the pathologists' reviews say about the model.

Built from :meth:`Corrections.stats` with fpdf2 (pure Python, no browser or LaTeX to install):
agreement overall, per predicted class and per model version, the predicted-vs-corrected
confusion, and the images reviewers disagree on.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def report_pdf(stats: dict[str, Any], title: str = "HematoVision - reviewed predictions") -> bytes:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 15)
    pdf.cell(0, 10, title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=9)
    overall = stats["overall"]
    rate = "n/a" if overall["agreement"] is None else f"{overall['agreement']:.1%}"
    pdf.cell(
        0,
        6,
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. {stats['corrections']} reviews; "
        f"reviewers confirmed the model on {overall['confirmed']} of {overall['reviewed']} ({rate}).",
        new_x="LMARGIN",
        new_y="NEXT",
    )

    def table(heading: str, header: list[str], rows: list[list[str]]) -> None:
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 11)
        pdf.cell(0, 8, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=9)
        with pdf.table(text_align="CENTER", first_row_as_headings=True) as t:
            for row in [header, *rows]:
                r = t.row()
                for value in row:
                    r.cell(str(value))

    def agreement_rows(groups: dict[str, Any]) -> list[list[str]]:
        return [
            [k, v["reviewed"], v["confirmed"], "n/a" if v["agreement"] is None else f"{v['agreement']:.1%}"]
            for k, v in groups.items()
        ] or [["(none)", "", "", ""]]

    table(
        "Agreement per predicted class",
        ["predicted", "reviewed", "confirmed", "agreement"],
        agreement_rows(stats["per_class"]),
    )
    table(
        "Agreement per model version",
        ["version", "reviewed", "confirmed", "agreement"],
        agreement_rows(stats["per_model_version"]),
    )
    table("Agreement per day", ["day", "reviewed", "confirmed", "agreement"], agreement_rows(stats["per_day"]))
    classes = stats["confusion"]["classes"]
    table(
        "Predicted (rows) vs corrected (columns)",
        ["predicted \\ corrected", *classes],
        [[c, *row] for c, row in zip(classes, stats["confusion"]["matrix"])],
    )
    disputed = stats["disputed_images"]
    table(
        "Images reviewers disagree on",
        ["image (sha256)", "labels"],
        [[sha[:16], ", ".join(f"{who}: {label}" for who, label in labels.items())] for sha, labels in disputed.items()]
        or [["(none)", ""]],
    )
    return bytes(pdf.output())
