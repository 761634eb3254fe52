"""The one error type the config loader raises, carrying every problem it found."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a config: where (key path or line/column) and what."""

    message: str
    path: str = ""  # key path such as "intercept[0].ports[2]"
    line: int | None = None
    column: int | None = None

    def render(self, source: str) -> str:
        if self.line is not None:
            where = f"{source}:{self.line}:{self.column or 1}"
        elif self.path:
            where = f"{source}: {self.path}"
        else:
            where = source
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A config that cannot be used. Permanent: retrying the same text fails the same way."""

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = source
        self.problems = tuple(problems)
        super().__init__("\n".join(p.render(source) for p in self.problems))
