// The dashboard's only page-wide script: htmx requests carry the session's CSRF
// token (read from a meta tag; the session cookie itself is HttpOnly).
"use strict";
document.addEventListener("htmx:configRequest", function (event) {
  var meta = document.querySelector('meta[name="csrf-token"]');
  if (meta) {
    event.detail.headers["X-CSRF-Token"] = meta.content;
  }
});
