"""The survey's organisation of MLLM explainability: perspectives and their levels.

Every registered method names one ``level`` from here, so ``mmscope methods`` can print each
method where the survey puts it.
"""

from __future__ import annotations

SURVEY: dict[str, tuple[str, ...]] = {
    "data": ("data/input-output", "data/benchmark", "data/application"),
    "model": (
        "model/token",
        "model/embedding",
        "model/neuron",
        "model/layer",
        "model/architecture",
    ),
    "training and inference": ("training/dynamics", "inference/decoding"),
}
LEVELS: tuple[str, ...] = tuple(level for levels in SURVEY.values() for level in levels)


def tree(
    entries: list[tuple[str, str, str, str]], notes: dict[str, str] | None = None
) -> list[str]:
    """Lines of the survey tree with ``(level, key, family, paper)`` entries under their level;
    ``notes`` adds a line under an entry (why it does not apply to a model)."""
    lines, notes = [], notes or {}
    for perspective, levels in SURVEY.items():
        lines.append(perspective)
        for level in levels:
            mine = sorted(e for e in entries if e[0] == level)
            lines.append(f"  {level.split('/')[1]}" + ("" if mine else "  (nothing yet)"))
            for _, key, family, paper in mine:
                lines.append(f"    {key:<28} {family:<24} {paper}")
                if key in notes:
                    lines.append(f"      {notes[key]}")
    return lines
