"""Move the project to another Ray version in one command: every place that names it, rewritten.

    python tools/pin_ray.py 2.61.0

The pin lives in pyproject.toml (``ray[...]==VERSION``: what `make install`, the Docker image's
wheel and the cluster launcher's nodes install); the Dockerfile's base image and every KubeRay
manifest's ``rayVersion`` must name the same version, and tests/test_cluster_configs.py checks that
they do, and that the Ray installed is that one.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLACES = {  # file (glob) -> the pattern whose one group is the version
    "pyproject.toml": r'"ray\[train,serve,tune\]==([0-9][0-9.]*)"',
    "Dockerfile": r"^ARG RAY_VERSION=([0-9][0-9.]*)$",
    "cluster/kuberay/*.yaml": r'rayVersion: "([0-9][0-9.]*)"',
}


def pinned(root: Path = REPO) -> str:
    """The Ray version pyproject.toml pins."""
    match = re.search(PLACES["pyproject.toml"], (root / "pyproject.toml").read_text())
    if not match:
        raise SystemExit(f"{root / 'pyproject.toml'}: no exact ray pin (ray[train,serve,tune]==VERSION)")
    return match.group(1)


def versions(root: Path = REPO) -> dict[str, list[str]]:
    """Every version named, by file."""
    found = {}
    for pattern, regex in PLACES.items():
        for path in sorted(root.glob(pattern)):
            found[str(path.relative_to(root))] = re.findall(regex, path.read_text(), re.MULTILINE)
    return found


def pin(version: str, root: Path = REPO) -> list[str]:
    """Rewrite every place to ``version``; returns the files changed."""
    if not re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", version):
        raise SystemExit(f"not a Ray release version: {version!r} (e.g. 2.61.0)")
    changed = []
    for pattern, regex in PLACES.items():
        for path in sorted(root.glob(pattern)):
            text = path.read_text()
            new = re.sub(regex, lambda m: m.group(0).replace(m.group(1), version), text, flags=re.MULTILINE)
            if new != text:
                path.write_text(new)
                changed.append(str(path.relative_to(root)))
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", help="the Ray release to pin, e.g. 2.61.0")
    args = parser.parse_args()
    for name in pin(args.version):
        print(f"pinned Ray {args.version} in {name}")
    print("then: make install (a fresh .venv), make test, and rebuild and push the image")


if __name__ == "__main__":
    main()
