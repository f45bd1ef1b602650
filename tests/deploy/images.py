"""What a compose service's image holds, read from its Dockerfile: stage chain and copied files."""
from __future__ import annotations

import fnmatch
import posixpath
from pathlib import Path
from typing import Any

from tests.deploy.dockerfile import Stage, copy_sources, parse_dockerfile


def build_stages(build: dict[str, Any]) -> list[Stage]:
    """The stages a compose `build:` produces, root first, ending at its target (or last) stage."""
    dockerfile = Path(build["context"]) / build.get("dockerfile", "Dockerfile")
    _, stages = parse_dockerfile(dockerfile)
    by_name = {stage.name: stage for stage in stages if stage.name}
    target = build.get("target")
    if target is not None and target not in by_name:
        raise AssertionError(f"{dockerfile}: no stage named {target!r}")
    chain = [by_name[target] if target else stages[-1]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def copied_paths(chain: list[Stage], context: Path) -> dict[str, Path]:
    """Container path -> build-context path for every COPY (not --from) along a stage chain."""
    copied: dict[str, Path] = {}
    workdir = "/"
    for stage in chain:
        for keyword, args in stage.instructions:
            if keyword == "WORKDIR":
                workdir = posixpath.join(workdir, args)
            elif keyword == "COPY":
                sources, dest, from_stage = copy_sources(args)
                if from_stage is not None:
                    continue
                dest = posixpath.join(workdir, dest)
                for source in sources:
                    host = context / source
                    into_dir = dest.endswith("/") or len(sources) > 1 or host.is_dir()
                    inside = posixpath.join(dest, posixpath.basename(source.rstrip("/")))
                    container = inside if into_dir and not host.is_dir() else dest.rstrip("/")
                    copied[container] = host
    return copied


def effective(chain: list[Stage], keyword: str) -> str | None:
    """The last value of an inherited instruction (USER, ENTRYPOINT, HEALTHCHECK) along a chain."""
    found = None
    for stage in chain:
        found = stage.last(keyword) or found
    return found


def dockerignore_rules(dockerfile: Path) -> list[str]:
    """Rules of `<dockerfile>.dockerignore` (BuildKit's per-Dockerfile ignore file)."""
    path = dockerfile.with_name(dockerfile.name + ".dockerignore")
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def dockerignore_allows(rules: list[str], path: str) -> bool:
    """Whether the context path survives the rules (the last matching rule wins; `!` re-adds)."""
    included = True
    for rule in rules:
        negated = rule.startswith("!")
        pattern = (rule[1:] if negated else rule).strip("/")
        if _ignore_pattern_matches(pattern, path.strip("/")):
            included = negated
    return included


def _ignore_pattern_matches(pattern: str, path: str) -> bool:
    parts = path.split("/")
    if pattern.startswith("**/"):
        return any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
