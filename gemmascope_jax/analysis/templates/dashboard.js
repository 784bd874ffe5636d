// Search over the latents of this dashboard: by latent id (e.g. 123 or L9/123) and by token
// (tokens of the max-activating examples and of the logit lens). Data: window.GSJ_INDEX, from
// index_data.js loaded with a <script> tag, so the site works from file:// without a server.
(function () {
  "use strict";
  var MAX_HITS = 100;

  function norm(s) {
    return String(s).trim().toLowerCase();
  }

  function search(entries, query) {
    var q = norm(query);
    if (!q) return [];
    var byId = [], strong = [], weak = [];
    entries.forEach(function (e) {
      if (norm(e.name) === q || String(e.flat) === q || ("l" + e.layer + "/" + e.id) === q) {
        byId.push({ entry: e, why: "latent id" });
        return;
      }
      var hit = e.top.concat(e.lens).filter(function (t) { return norm(t).indexOf(q) >= 0; });
      if (hit.length) {
        strong.push({ entry: e, why: "token " + JSON.stringify(hit[0]) });
        return;
      }
      var ctx = e.context.filter(function (t) { return norm(t).indexOf(q) >= 0; });
      if (ctx.length) weak.push({ entry: e, why: "context token " + JSON.stringify(ctx[0]) });
    });
    return byId.concat(strong, weak).slice(0, MAX_HITS);
  }

  function render(results, hits) {
    results.textContent = "";
    if (!hits.length) {
      results.textContent = "no latent matches";
      return;
    }
    hits.forEach(function (h) {
      var div = document.createElement("div");
      div.className = "hit";
      var a = document.createElement("a");
      a.href = h.entry.href;
      a.textContent = "latent " + h.entry.name;
      div.appendChild(a);
      div.appendChild(document.createTextNode(
        "  (" + h.why + ", density " + h.entry.density.toExponential(2) + ")"));
      results.appendChild(div);
    });
  }

  window.gsjSearch = search;
  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("search");
    var results = document.getElementById("results");
    if (!box || !results || !window.GSJ_INDEX) return;
    box.addEventListener("input", function () {
      render(results, search(window.GSJ_INDEX.latents, box.value));
    });
  });
})();
