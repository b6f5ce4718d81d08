"""An HTML template for `dvc plots show` / `dvc plots diff` that renders without a network.

DVC's HTML page loads vega, vega-lite and vega-embed from a CDN (`dvc_render.VegaRenderer.SCRIPTS`),
so opened offline (or on a machine that blocks jsdelivr) every plot is blank. DVC takes another page
as `--html-template` or the `plots.html_template` config (set in this project's `.dvc/config`): any
HTML with a `{plot_divs}` placeholder; without a `{scripts}` placeholder the CDN tags are dropped.
Our template inlines the three libraries' minified builds (about 820 KB), so the page DVC writes is
one self-contained file.

The template is committed (`vega/offline.html`), not fetched at `make` time: a fresh clone then shows
plots offline with plain `dvc plots show`, and the tests check the real page without a download.
What is in it is pinned by `vega/vega-lock.json`: the package versions (those DVC's own page loads,
so a plot looks the same either way), the npm registry's `dist.integrity` (sha512 of the tarball)
and the sha256 of each inlined file. `build` (network, `make plots-vendor`) downloads the tarballs,
refuses any whose sha512 differs from the lock or from the registry's metadata, and writes the
template; `check` (offline) verifies the committed template against the lock.

    python -m l2rclip.evaluation.offline_plots check      # from the project root (paths default to vega/...)
    python -m l2rclip.evaluation.offline_plots build      # after editing versions in the lock: add --update
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import sys
import tarfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

LOCK = Path("vega/vega-lock.json")
TEMPLATE = Path("vega/offline.html")
LICENSES = Path("vega/LICENSES.txt")
REGISTRY = "https://registry.npmjs.org"
_BLOCK = re.compile(
    r"<!-- (?P<name>[\w-]+)@(?P<version>[\w.-]+) (?P<file>\S+) sha256=[0-9a-f]{64} -->\n"
    r"<script>\n(?P<code>.*?)\n</script>",
    re.DOTALL,
)
# dvc_render fills these placeholders by plain string replacement; inlined code must not contain them
_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>DVC plots</title>
<!-- Offline page for `dvc plots show` (l2rclip/evaluation/offline_plots.py): vega, vega-lite and vega-embed are
     inlined below (BSD-3-Clause, see vega/LICENSES.txt); nothing is loaded from a network. -->
{blocks}
<style>
    table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""

Fetch = Callable[[str], bytes]


def read_lock(path: Path = LOCK) -> list[dict[str, str]]:
    """The pinned packages: name, version, tarball, integrity, file (in the tarball) and sha256."""
    lock = json.loads(path.read_text(encoding="utf-8"))
    packages = lock.get("packages") if isinstance(lock, dict) else None
    need = ("name", "version", "tarball", "integrity", "file")
    if (
        not isinstance(packages, list)
        or not packages
        or any(not isinstance(p, dict) or any(not isinstance(p.get(k), str) for k in need) for p in packages)
    ):
        raise ValueError(f"{path}: expected {{'packages': [{{{', '.join(need)}, sha256}}, ...]}}, found {lock!r}")
    return packages


def _sri_sha512(data: bytes) -> str:
    """The Subresource Integrity string npm records as `dist.integrity`."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (https URLs from the lock)
        return response.read()


def fetch_package(package: dict[str, str], fetch: Fetch = _download) -> tuple[bytes, bytes]:
    """The pinned file and the LICENSE of one package, from its tarball verified against the lock and npm.

    Raises:
        ValueError: the registry's integrity or the tarball's sha512 differs from the lock's.
    """
    where = f"{package['name']}@{package['version']}"
    meta = json.loads(fetch(f"{REGISTRY}/{package['name']}/{package['version']}"))
    if meta["dist"]["integrity"] != package["integrity"]:
        raise ValueError(
            f"{where}: the registry's integrity is {meta['dist']['integrity']}, the lock's {package['integrity']}"
        )
    tarball = fetch(package["tarball"])
    if (found := _sri_sha512(tarball)) != package["integrity"]:
        raise ValueError(f"{where}: {package['tarball']} has integrity {found}, expected {package['integrity']}")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        code = _read_member(archive, package["file"], where)
        license_text = _read_member(archive, "package/LICENSE", where)
    return code, license_text


def _read_member(archive: tarfile.TarFile, name: str, where: str) -> bytes:
    """The bytes of the file `name` in a package's tarball (tarfile raises KeyError when it is absent)."""
    member = archive.extractfile(name)
    if member is None:
        raise ValueError(f"{where}: expected {name} to be a file in the package tarball, found something else")
    return member.read()


def _block(package: dict[str, str], code: str) -> str:
    shown = package["file"].removeprefix("package/")
    return (
        f"<!-- {package['name']}@{package['version']} {shown} sha256={package['sha256']} -->\n"
        f"<script>\n{code}\n</script>"
    )


def render_template(packages: Sequence[dict[str, str]], codes: Sequence[str]) -> str:
    """The template page with each package's code inlined in a marked `<script>` block."""
    for package, code in zip(packages, codes, strict=True):
        bad = [p for p in _PLACEHOLDERS if p in code] + (["</script"] if "</script" in code.lower() else [])
        if bad:
            raise ValueError(
                f"{package['name']}@{package['version']}: the code contains {bad}, which would "
                "break the inlined page"
            )
    return _PAGE.format(blocks="\n".join(_block(p, c) for p, c in zip(packages, codes, strict=True)))


def build(
    lock: Path = LOCK,
    template: Path = TEMPLATE,
    licenses: Path = LICENSES,
    update: bool = False,
    fetch: Fetch = _download,
) -> Path:
    """Download, verify and inline the pinned packages; returns the template's path.

    Args:
        lock: the pinned packages (`read_lock`).
        template: the page to write.
        licenses: where the packages' LICENSE texts go.
        update: record the sha256 of the files as downloaded (after a version change in the lock)
            instead of requiring the recorded ones.
        fetch: URL -> bytes (the network; tests pass a dictionary's lookup).
    """
    packages = read_lock(lock)
    codes, notices = [], []
    for package in packages:
        code, license_text = fetch_package(package, fetch)
        digest = hashlib.sha256(code).hexdigest()
        if not update and digest != package.get("sha256"):
            raise ValueError(
                f"{package['name']}@{package['version']} {package['file']}: sha256 {digest}, "
                f"the lock records {package.get('sha256')} (use --update after changing versions)"
            )
        package["sha256"] = digest
        codes.append(code.decode("utf-8"))
        notices.append(f"== {package['name']}@{package['version']} ==\n{license_text.decode('utf-8').strip()}\n")
    template.write_text(render_template(packages, codes), encoding="utf-8")
    licenses.write_text("\n".join(notices), encoding="utf-8")
    if update:
        lock.write_text(
            json.dumps({**json.loads(lock.read_text(encoding="utf-8")), "packages": packages}, indent=2) + "\n",
            encoding="utf-8",
        )
    return template


def check(lock: Path = LOCK, template: Path = TEMPLATE) -> list[str]:
    """Problems of the committed template against the lock (empty: it is what the lock pins)."""
    if not template.is_file():
        return [f"{template}: missing (run `python -m l2rclip.evaluation.offline_plots build`)"]
    placeholder = (
        []
        if "{plot_divs}" in template.read_text(encoding="utf-8")
        else [f"{template}: no {{plot_divs}} placeholder (DVC refuses the template)"]
    )
    return placeholder + inlined_problems(lock, template)


def inlined_problems(lock: Path, page: Path) -> list[str]:
    """Problems of a page (the template, or one DVC wrote from it) as to the inlined libraries.

    Empty when it loads no script by URL and holds each pinned package's file, unchanged.
    """
    text = page.read_text(encoding="utf-8")
    blocks = {m["name"]: m for m in _BLOCK.finditer(text)}
    problems = (
        [f"{page}: has a <script src=...> tag; the page must load nothing"]
        if re.search(r"<script[^>]*\bsrc=", text)
        else []
    )
    for package in read_lock(lock):
        block = blocks.get(package["name"])
        if block is None:
            problems.append(f"{page}: no inlined block for {package['name']}")
            continue
        digest = hashlib.sha256(block["code"].encode("utf-8")).hexdigest()
        if (block["version"], digest) != (package["version"], package.get("sha256")):
            problems.append(
                f"{page}: {package['name']}@{block['version']} sha256 {digest}; the lock pins "
                f"{package['version']} sha256 {package.get('sha256')}"
            )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `check` the committed template, or `build` it from the npm registry."""
    parser = argparse.ArgumentParser(
        prog="python -m l2rclip.evaluation.offline_plots", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("check", "build"))
    parser.add_argument("--lock", type=Path, default=LOCK, help="pinned packages (default: %(default)s)")
    parser.add_argument("--template", type=Path, default=TEMPLATE, help="the page (default: %(default)s)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="build: record the downloaded files' sha256 in the lock (after a version change)",
    )
    args = parser.parse_args(argv)
    if args.action == "build":
        print(build(args.lock, args.template, args.template.with_name(LICENSES.name), args.update))
        return 0
    problems = check(args.lock, args.template)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.template}: matches {args.lock}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
