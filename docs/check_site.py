"""Check the built docs site in a real headless browser (``make docs-check``).

Every page (each ``index.html`` under the site directory) is opened by headless
Chromium with name resolution disabled (so no network: everything a page needs
must ship with the site), and the DOM it dumps *after* the page's scripts ran
is checked for:

- a formula left untypeset: an ``.arithmatex`` element (pymdownx.arithmatex)
  with no ``.katex`` descendant, i.e. KaTeX did not load or could not parse it;
- a ``.katex-error`` element (what KaTeX emits with ``throwOnError: false``);
- reST left in the text: roles such as ``:func:`x```, directives ``.. math::``;
- a literal ``\\(``, ``\\[`` or ``$$`` in the visible text (outside code);
- an unresolved cross-reference: an ``<autoref>`` element (mkdocs-autorefs did
  not run on it) or its literal ``[title][identifier]`` / ``[identifier][]``
  text (what mkdocs-autorefs 1.4.5 leaves for a target it cannot find).

It also checks that every ``url()`` of the vendored KaTeX css exists in the
site, and writes screenshots of the home and optimizers pages (1280 px wide).

Standard library only, plus the ``chromium`` executable (``$CHROMIUM``
overrides it). Exit status: 0 clean, 1 findings, 2 no Chromium / no site.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

# Elements whose text is not checked: not shown (head, scripts) or code blocks.
SKIP_TAGS = {
    "head",
    "script",
    "style",
    "noscript",
    "template",
    "textarea",
    "pre",
    "svg",
    "math",
}
VOID_TAGS = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
    "param", "source", "track", "wbr",
}  # fmt: skip

REST_ROLE = re.compile(
    r":(?:py:)?(?:math|func|class|meth|data|mod|attr|obj|exc|ref|doc):`"
)
REST_DIRECTIVE = re.compile(r"\.\. [a-z][a-z-]*::")
RAW_MATH = re.compile(r"\\\(|\\\[|\$\$")
# mkdocs-autorefs 1.4.5 (fix_ref) replaces an unresolved reference by
# "[title][identifier]", "[identifier][]" or "[<code>identifier</code>][]".
UNRESOLVED_REF = re.compile(r"\[([^\[\]\n]{1,300})\]\[([^\[\]\s]*)\]")

# Chromium must not reach the network: every host name fails to resolve.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
    "--virtual-time-budget=10000",
]


@dataclass
class PageResult:
    page: str
    findings: list[tuple[str, str]] = field(default_factory=list)  # (kind, snippet)
    formulas: int = 0  # .katex elements: typeset formulas
    error: str = ""


class _DomScanner(HTMLParser):
    """Walks Chromium's serialized DOM once, collecting the checks' material."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        # frames: [tag, classes, attrs, skip_text, is_arith, typeset, arith_text]
        self.stack: list[list[Any]] = []
        self.skip = 0  # open elements whose text is not checked
        self.code = 0  # open inline <code> elements
        self.pieces: list[tuple[str, bool]] = []  # visible text, and whether it is code
        self.findings: list[tuple[str, str]] = []
        self.formulas = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "autoref":
            self.findings.append(
                ("unresolved cross-reference (<autoref>)", a.get("identifier", "?"))
            )
        if "katex-error" in classes:
            self.findings.append(("katex-error", a.get("title", "") or "(no title)"))
        if "katex" in classes:
            self.formulas += 1
            for frame in self.stack:
                if frame[4]:
                    frame[5] = True
        if tag in VOID_TAGS:
            return
        is_arith = "arithmatex" in classes
        skip = tag in SKIP_TAGS or "katex" in classes or is_arith
        if tag == "code" and not self.skip:
            self.code += 1
            self.pieces.append(("`", True))
        self.stack.append([tag, classes, a, skip, is_arith, False, []])
        self.skip += skip

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS:
            return
        # Chromium's serializer closes every element, so the stack matches;
        # pop up to the matching tag anyway, in case.
        while self.stack:
            frame = self.stack.pop()
            self.skip -= frame[3]
            if frame[4] and not frame[5]:
                tex = " ".join("".join(frame[6]).split())
                self.findings.append(
                    ("untypeset formula", tex if len(tex) <= 160 else tex[:157] + "...")
                )
            if frame[0] == "code" and not self.skip:
                self.code -= 1
                self.pieces.append(("`", True))
            if frame[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for frame in self.stack:
            if frame[4] and not frame[5]:
                frame[6].append(data)
        if not self.skip:
            self.pieces.append((data, self.code > 0))


def _snippet(text: str, start: int, end: int, width: int = 40) -> str:
    s = text[max(0, start - width) : end + width]
    return " ".join(s.split())


def scan_dom(dom: str) -> tuple[list[tuple[str, str]], int]:
    """The findings ``(kind, snippet)`` of one page's DOM, and its formula count."""
    p = _DomScanner()
    p.feed(dom)
    p.close()
    findings = list(p.findings)
    text = "".join(s for s, _ in p.pieces)
    in_code = bytearray()
    for s, c in p.pieces:
        in_code.extend(b"\x01" * len(s) if c else b"\x00" * len(s))

    def outside(*idx: int) -> bool:
        return all(not in_code[i] for i in idx)

    # a role's trailing ` is the <code> Markdown made of `x`: only its start
    # must lie outside code
    for kind, rx in (
        ("reST role", REST_ROLE),
        ("reST directive", REST_DIRECTIVE),
        ("raw TeX delimiter in text", RAW_MATH),
    ):
        for m in rx.finditer(text):
            if outside(m.start(), m.end() - 2):
                findings.append((kind, _snippet(text, m.start(), m.end())))
    for m in UNRESOLVED_REF.finditer(text):
        mid = m.end(1)  # the "][" between title and identifier
        if outside(m.start(), mid, mid + 1, m.end() - 1):
            findings.append(
                ("unresolved cross-reference", _snippet(text, m.start(), m.end(), 30))
            )
    return findings, p.formulas


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if os.access(env, os.X_OK) else None)
    for name in (
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(
    chromium: str, url: str, extra: list[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="check-site-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_page(chromium: str, site: Path, page: Path, timeout: float) -> PageResult:
    res = PageResult(page=str(page.parent.relative_to(site)).replace(os.sep, "/") + "/")
    res.page = "/" if res.page == "./" else res.page
    try:
        proc = run_chromium(chromium, page.resolve().as_uri(), ["--dump-dom"], timeout)
    except subprocess.TimeoutExpired:
        res.error = f"chromium timed out after {timeout:.0f} s"
        return res
    if proc.returncode != 0 or "<html" not in proc.stdout:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        res.error = f"chromium exited {proc.returncode} without a DOM:\n{tail}"
        return res
    res.findings, res.formulas = scan_dom(proc.stdout)
    return res


def screenshot(chromium: str, page: Path, dest: Path, timeout: float) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    extra = [f"--screenshot={dest.resolve()}", "--window-size=1280,4000"]
    try:
        run_chromium(chromium, page.resolve().as_uri(), extra, timeout)
    except subprocess.TimeoutExpired:
        return f"screenshot of {page} timed out"
    return "" if dest.exists() else f"screenshot of {page} was not written"


def check_katex_assets(site: Path) -> list[tuple[str, str]]:
    css = site / "assets" / "katex" / "katex.min.css"
    out = []
    for rel in ("katex.min.css", "katex.min.js", "contrib/auto-render.min.js"):
        if not (css.parent / rel).is_file():
            out.append(("missing KaTeX file", f"assets/katex/{rel}"))
    if css.is_file():
        for u in re.findall(r"url\(['\"]?([^)'\"]+)['\"]?\)", css.read_text()):
            if "://" in u or u.startswith("data:") or not (css.parent / u).is_file():
                out.append(("KaTeX css url() not shipped", u))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "site", nargs="?", default="out/site", help="the built site (default: out/site)"
    )
    ap.add_argument(
        "--jobs", "-j", type=int, default=3, help="pages checked at once (default 3)"
    )
    ap.add_argument(
        "--shots", default="out", help="where screenshots go (default: out)"
    )
    ap.add_argument("--timeout", type=float, default=90, help="seconds per page")
    ap.add_argument(
        "--max-per-kind",
        type=int,
        default=10,
        help="findings listed per page and kind (0: all)",
    )
    args = ap.parse_args(argv)

    site = Path(args.site)
    pages = sorted(site.rglob("index.html"))
    if not pages:
        print(
            f"check_site: no index.html under {site}: build the site first (make docs)",
            file=sys.stderr,
        )
        return 2
    chromium = find_chromium()
    if chromium is None:
        print(
            "check_site: chromium not found: apt-get install chromium, "
            "or set $CHROMIUM to a Chromium/Chrome executable",
            file=sys.stderr,
        )
        return 2

    t0 = time.monotonic()
    shots = {
        site / "index.html": Path(args.shots) / "index.png",
        site / "api" / "optimizers" / "index.html": Path(args.shots) / "optimizers.png",
    }
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        shot_jobs = {
            dest: pool.submit(screenshot, chromium, page, dest, args.timeout)
            for page, dest in shots.items()
            if page.is_file()
        }
        results = list(
            pool.map(lambda p: check_page(chromium, site, p, args.timeout), pages)
        )
        shot_errors = [e for e in (j.result() for j in shot_jobs.values()) if e]

    site_findings = check_katex_assets(site)
    failed = bool(site_findings)
    for kind, snip in site_findings:
        print(f"FAIL site: {kind}: {snip}")
    for r in results:
        if r.error:
            failed = True
            print(f"FAIL {r.page}: {r.error}")
            continue
        if not r.findings:
            continue
        failed = True
        by_kind: dict[str, list[str]] = {}
        for kind, snip in r.findings:
            by_kind.setdefault(kind, []).append(snip)
        counts = ", ".join(f"{len(v)} {k}" for k, v in by_kind.items())
        print(f"FAIL {r.page}: {counts}")
        for kind, snips in by_kind.items():
            shown = snips if args.max_per_kind <= 0 else snips[: args.max_per_kind]
            for s in shown:
                print(f"    {kind}: {s}")
            if len(shown) < len(snips):
                print(f"    {kind}: ... and {len(snips) - len(shown)} more")
    for e in shot_errors:
        print(f"warning: {e}", file=sys.stderr)
    for dest, job in shot_jobs.items():
        if not job.result():
            print(f"screenshot: {dest}")

    n_bad = sum(1 for r in results if r.findings or r.error)
    print(
        f"check_site: {len(results)} pages checked in headless Chromium, "
        f"{sum(r.formulas for r in results)} formulas typeset, "
        f"{n_bad} page(s) with findings, {time.monotonic() - t0:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
