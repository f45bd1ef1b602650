"""A small Dockerfile reader: stages, instructions, COPY sources, exec-form arguments."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class Stage:
    """One FROM ... [AS name] block and its instructions (keyword upper-cased, raw arguments)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.args(keyword)
        return found[-1] if found else None


def logical_lines(text: str) -> list[str]:
    """Instructions with backslash continuations joined, comments and blank lines dropped."""
    lines, pending = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    if pending:
        lines.append(pending.strip())
    return lines


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order) of a Dockerfile."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if keyword == "ARG" and "=" in args:
                key, value = args.split("=", 1)
                global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def exec_form(args: str) -> list[str]:
    """A JSON exec-form argument list (ENTRYPOINT/CMD); ValueError for the shell form."""
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as error:
        raise ValueError(f"not exec form (JSON array): {args!r}") from error
    if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
        raise ValueError(f"not a JSON array of strings: {args!r}")
    return parsed


def healthcheck_command(args: str) -> list[str]:
    """The CMD of `HEALTHCHECK [--options] CMD [...]` as an argv list."""
    head, sep, command = args.partition("CMD ")
    if not sep:
        raise ValueError(f"HEALTHCHECK without CMD: {args!r}")
    return exec_form(command.strip())


def copy_sources(args: str) -> tuple[list[str], str, str | None]:
    """(sources, destination, --from stage or None) of a COPY/ADD argument string."""
    words = shlex.split(args)
    from_stage = None
    plain = []
    for word in words:
        if word.startswith("--from="):
            from_stage = word.split("=", 1)[1]
        elif not word.startswith("--"):
            plain.append(word)
    return plain[:-1], plain[-1], from_stage
