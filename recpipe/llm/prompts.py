"""Versioned prompt templates: recpipe/prompts/<name>.txt, '#' comment lines, then a [system] and a [user]
section; the user section holds `{metadata}`. A template's hash (of the file's bytes) is part of every cache
key, so editing a prompt never reuses answers to the old one."""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass

from recpipe.errors import ConfigError
from recpipe.llm.text import shingles


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: str
    hash: str  # sha256 of the file's bytes (16 hex): part of every cache key

    @property
    def echo(self) -> frozenset[str]:
        """Shingles of the instructions (metadata excluded): small models sometimes answer by echoing them."""
        return shingles(self.system + "\n" + self.user.replace("{metadata}", "\n"))

    def messages(self, metadata: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.user.replace("{metadata}", metadata)}]


def load_template(name: str) -> Template:
    """A versioned prompt from recpipe/prompts/<name>.txt: '#' comment lines, then [system] and [user]."""
    try:
        raw = importlib.resources.files("recpipe.prompts").joinpath(f"{name}.txt").read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"prompt template {name!r} not found in recpipe/prompts") from None
    sections: dict[str, list[str]] = {}
    current = None
    for line in raw.decode("utf-8").splitlines():
        if current is None and line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(system|user)\]\s*", line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    if "user" not in sections or "{metadata}" not in "\n".join(sections["user"]):
        raise ConfigError(f"prompt template {name!r}: needs a [user] section containing {{metadata}}")
    return Template(
        name=name,
        system="\n".join(sections.get("system", [])).strip(),
        user="\n".join(sections["user"]).strip(),
        hash=hashlib.sha256(raw).hexdigest()[:16],
    )
