// A small, safe Markdown renderer for replies: everything is escaped first, then a known set of
// constructs is turned into HTML (code blocks, inline code, headings, lists, quotes, bold, italic,
// links). No raw HTML from the model ever reaches the page.
"use strict";

const Markdown = (() => {
  function escape(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function inline(text) {
    // code spans first, so nothing inside them is formatted
    const parts = text.split(/(`[^`\n]+`)/g);
    return parts.map((part) => {
      if (part.length > 1 && part.startsWith("`") && part.endsWith("`")) {
        return `<code>${escape(part.slice(1, -1))}</code>`;
      }
      let html = escape(part);
      html = html.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
      html = html.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
      html = html.replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
      html = html.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
      return html;
    }).join("");
  }

  function blocks(text) {
    const out = [];
    let para = [];
    let list = null; // {tag, items}
    const flushPara = () => {
      if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`);
      para = [];
    };
    const flushList = () => {
      if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`);
      list = null;
    };
    for (const line of text.split("\n")) {
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      const quote = line.match(/^>\s?(.*)$/);
      if (heading) {
        flushPara(); flushList();
        const level = Math.min(heading[1].length + 2, 6); // keep headings smaller than the page's own
        out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      } else if (bullet || numbered) {
        flushPara();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
        list.items.push((bullet || numbered)[1]);
      } else if (quote) {
        flushPara(); flushList();
        out.push(`<blockquote>${inline(quote[1])}</blockquote>`);
      } else if (!line.trim()) {
        flushPara(); flushList();
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara(); flushList();
    return out.join("");
  }

  // Fenced code blocks (```lang ... ```); an unclosed fence (mid-stream) runs to the end.
  function render(text) {
    const out = [];
    const fence = /```([\w+-]*)[^\n]*\n?([\s\S]*?)(```|$)/g;
    let last = 0;
    let m;
    while ((m = fence.exec(text)) !== null) {
      if (m.index > last) out.push(blocks(text.slice(last, m.index)));
      const lang = m[1] ? ` data-lang="${escape(m[1])}"` : "";
      out.push(`<div class="code"${lang}><button type="button" class="copy" title="copy">copy</button>` +
        `<pre><code>${escape(m[2].replace(/\n$/, ""))}</code></pre></div>`);
      last = fence.lastIndex;
      if (m[0].length === 0) break;
    }
    if (last < text.length) out.push(blocks(text.slice(last)));
    return out.join("");
  }

  return { render, escape };
})();
