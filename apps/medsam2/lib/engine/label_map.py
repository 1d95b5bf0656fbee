"""The labels a request may name (name -> value)."""

from __future__ import annotations

from typing import Any

from lib.errors import PromptError


class LabelMap:
    """The task's labels (name -> value); resolves what a request names, by name or by value."""

    def __init__(self, labels: dict[str, int]):
        if not labels:
            raise ValueError("at least one label is needed")
        self.by_name = {str(k): int(v) for k, v in labels.items()}
        self.by_value = {v: k for k, v in self.by_name.items()}

    @property
    def default(self) -> str:
        return next(iter(self.by_name))

    def resolve(self, label: Any) -> tuple[str, int]:
        if label is None or label == "":
            name = self.default
            return name, self.by_name[name]
        if isinstance(label, str) and label in self.by_name:
            return label, self.by_name[label]
        if isinstance(label, str):
            lowered = {k.lower(): k for k in self.by_name}
            if label.lower() in lowered:
                name = lowered[label.lower()]
                return name, self.by_name[name]
        if isinstance(label, (int, str)) and not isinstance(label, bool):
            try:
                value = int(label)
            except ValueError:
                value = None
            if value in self.by_value:
                return self.by_value[value], value
        known = ", ".join(f"{k} ({v})" for k, v in self.by_name.items())
        raise PromptError(
            f"Unknown label {label!r}. This model is configured with the labels: {known}. "
            f"Rename the segment to one of these, or start the server with --conf labels '{{\"name\":1,...}}' "
            "(no spaces: the monailabel launcher splits arguments at them)."
        )
