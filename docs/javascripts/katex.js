// Typesets every formula with the KaTeX vendored in docs/assets/katex (no CDN):
// mkdocs-material's KaTeX recipe. pymdownx.arithmatex (generic: true) wraps
// each formula in .arithmatex with \( \) or \[ \] delimiters. throwOnError is
// left at its default: auto-render then logs a formula KaTeX cannot parse to
// the console and leaves it as raw text, which docs/check_site.py
// (make docs-check) reports, as it reports any .katex-error element.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
  });
});
