"""The JavaScript the driver evaluates in a page: what an agent reads of it.

Kept apart from the Python that calls it; each function takes one argument
(Playwright's ``evaluate(expression, arg)``) and returns plain JSON.
"""

from __future__ import annotations

# A CSS selector that finds one element again: its id, else the tag path with
# :nth-of-type from the nearest ancestor that has an id (or the root).
_SELECTOR_OF = """
const selectorOf = (el) => {
  const parts = [];
  for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
    if (node.id && /^[A-Za-z][\\w-]*$/.test(node.id)) { parts.unshift('#' + node.id); break; }
    let part = node.tagName.toLowerCase();
    const parent = node.parentElement;
    if (parent) {
      const same = Array.from(parent.children).filter((c) => c.tagName === node.tagName);
      if (same.length > 1) part += `:nth-of-type(${same.indexOf(node) + 1})`;
    }
    parts.unshift(part);
  }
  return parts.join(' > ');
};
const textOf = (el) => (el.innerText || el.textContent || '').replace(/\\s+/g, ' ').trim();
"""

# [{index, tag, text, selector, attributes: {name: value}}] of every element matching the selector.
EXTRACT_ELEMENTS = (
    "({selector, attributes, limit}) => {"
    + _SELECTOR_OF
    + """
  return Array.from(document.querySelectorAll(selector)).slice(0, limit).map((el, index) => {
    const wanted = attributes && attributes.length ? attributes : Array.from(el.attributes).map((a) => a.name);
    const attrs = {};
    for (const name of wanted) {
      if (name === 'text') continue;
      const value = name in el && typeof el[name] !== 'object' && typeof el[name] !== 'function'
        ? el[name] : el.getAttribute(name);
      if (value !== null && value !== undefined) attrs[name] = String(value);
    }
    return {index, tag: el.tagName.toLowerCase(), text: textOf(el), selector: selectorOf(el), attributes: attrs};
  });
}"""
)

# The SDK's extract_content keys: readable text, interactive elements, content anchors.
EXTRACT_CONTENT = (
    "({includeInteractive, includeAnchors, maxAnchors, maxChars, maxInteractive}) => {"
    + _SELECTOR_OF
    + """
  const visible = (el) => {
    const style = getComputedStyle(el);
    const box = el.getBoundingClientRect();
    return style.visibility !== 'hidden' && style.display !== 'none' && box.width > 0 && box.height > 0;
  };
  const root = document.querySelector('main, article, [role=main]') || document.body;
  const clone = root ? root.cloneNode(true) : null;
  if (clone) clone.querySelectorAll('script, style, noscript, template, svg').forEach((n) => n.remove());
  const content = clone ? (clone.innerText || clone.textContent || '').replace(/[ \\t]+/g, ' ')
    .replace(/\\n\\s*\\n+/g, '\\n\\n').trim().slice(0, maxChars) : '';
  const out = {readable_content: {title: document.title, url: location.href, content}};
  if (includeInteractive) {
    const found = document.querySelectorAll(
      'a[href], button, input, select, textarea, [role=button], [role=link], [onclick], [contenteditable=true]');
    out.interactive_elements = Array.from(found).filter(visible).slice(0, maxInteractive).map((el) => ({
      tag: el.tagName.toLowerCase(),
      type: el.getAttribute('type') || el.getAttribute('role') || el.tagName.toLowerCase(),
      text: textOf(el) || el.getAttribute('aria-label') || el.getAttribute('placeholder') || el.value || '',
      selector: selectorOf(el),
      href: el.getAttribute('href'),
      name: el.getAttribute('name'),
    }));
  }
  if (includeAnchors) {
    const blocks = document.querySelectorAll('h1, h2, h3, h4, h5, h6, p, li, a, button, label, td, th');
    out.content_anchors = Array.from(blocks).filter(visible)
      .map((el) => ({text: textOf(el).slice(0, 200), selector: selectorOf(el), tag: el.tagName.toLowerCase()}))
      .filter((anchor) => anchor.text).slice(0, maxAnchors);
  }
  return out;
}"""
)
