// MathJax 3 settings for pymdownx.arithmatex (generic mode): typeset only the maths arithmatex
// marked, written as \( ... \) inline and \[ ... \] for display. The MathJax 3.2.2 build this site
// loads is bundled next to this file (javascripts/mathjax/tex-svg.js, Apache-2.0, from the npm
// package "mathjax"), so the pages render maths without network access.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
  svg: { fontCache: "global" },
};
