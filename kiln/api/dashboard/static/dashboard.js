// The dashboard's only page-wide script: htmx requests carry the session's CSRF
// token (read from a meta tag; the session cookie itself is HttpOnly).
"use strict";
document.addEventListener("htmx:configRequest", function (event) {
  var meta = document.querySelector('meta[name="csrf-token"]');
  if (meta) {
    event.detail.headers["X-CSRF-Token"] = meta.content;
  }
});
// A refusal answering a request whose target asks for it (data-show-errors) is
// shown there as text (htmx itself leaves a 4xx answer unswapped and silent).
document.addEventListener("htmx:beforeSwap", function (event) {
  var status = event.detail.xhr.status;
  var target = event.detail.target;
  if (status >= 400 && status < 500 && target && target.hasAttribute("data-show-errors")) {
    event.detail.shouldSwap = false;
    event.detail.isError = false;
    var line = document.createElement("p");
    line.className = "error";
    line.setAttribute("role", "alert");
    line.textContent = event.detail.xhr.responseText;
    target.replaceChildren(line);
  }
});
