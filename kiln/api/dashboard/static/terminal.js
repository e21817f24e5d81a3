// A terminal in the VM page: asks the server for a PTY (a POST carrying the CSRF
// token), then joins it over a WebSocket that the session cookie authenticates.
// The terminal fills its box (xterm's fit addon); whenever its size changes (the
// window resized) the PTY hears it as the protocol's control frame
// {"type": "resize", "cols", "rows"} (kiln/api/routers/pty.py).
"use strict";
(function () {
  var button = document.getElementById("open-terminal");
  if (!button) {
    return;
  }
  var statusLine = document.getElementById("terminal-status");
  var screen = document.getElementById("terminal");
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var nonce = document.querySelector('meta[name="csp-nonce"]').content;
  var COLS = 100;
  var ROWS = 24;

  // xterm.js adds <style> elements of its own; the page's CSP admits only those
  // carrying this response's nonce, so they get it as they are made.
  function withStyleNonce(action) {
    var create = document.createElement;
    document.createElement = function (name, options) {
      var element = create.call(document, name, options);
      if (String(name).toLowerCase() === "style") {
        element.nonce = nonce;
      }
      return element;
    };
    try {
      return action();
    } finally {
      document.createElement = create;
    }
  }

  function say(text) {
    statusLine.textContent = text;
  }

  async function openTerminal() {
    button.disabled = true;
    say("Opening a terminal…");
    var vmId = button.dataset.vmId;
    var answer = await fetch("/ui/vms/" + encodeURIComponent(vmId) + "/terminals", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ cols: COLS, rows: ROWS }),
      credentials: "same-origin",
    });
    if (!answer.ok) {
      say("Could not open a terminal: " + (await answer.text()));
      button.disabled = false;
      return;
    }
    var ptyId = (await answer.json()).pty_id;
    var term = new window.Terminal({ cols: COLS, rows: ROWS, convertEol: false });
    var fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    screen.classList.add("open"); // the box it fits, sized by the CSS
    withStyleNonce(function () {
      term.open(screen);
      fit.fit();
    });
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(
      scheme + window.location.host + "/ui/vms/" + encodeURIComponent(vmId) +
        "/terminals/" + encodeURIComponent(ptyId) + "/ws"
    );
    socket.binaryType = "arraybuffer";
    function sendSize() {
      if (socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
      }
    }
    socket.onopen = function () {
      sendSize(); // the PTY was made COLS x ROWS; the box may have fitted another size
      say("Connected.");
      term.focus();
    };
    term.onResize(sendSize);
    var refit = null;
    window.addEventListener("resize", function () {
      // Once per frame, however many resize events the window fires.
      if (refit === null) {
        refit = window.requestAnimationFrame(function () {
          refit = null;
          withStyleNonce(function () {
            fit.fit();
          });
        });
      }
    });
    socket.onmessage = function (event) {
      if (typeof event.data !== "string") {
        term.write(new Uint8Array(event.data));
        return;
      }
      // Text frames are the PTY protocol's control frames (exit, error), never output.
      var control = null;
      try {
        control = JSON.parse(event.data);
      } catch (error) {
        control = null;
      }
      if (control && control.type === "exit") {
        say("The shell exited with code " + control.exit_code + ".");
      } else if (control && control.type === "error") {
        say("Terminal: " + control.detail);
      } else {
        term.write(event.data);
      }
    };
    socket.onclose = function (event) {
      say("Disconnected" + (event.reason ? ": " + event.reason : "."));
      button.disabled = false;
    };
    term.onData(function (data) {
      if (socket.readyState === WebSocket.OPEN) {
        socket.send(new TextEncoder().encode(data));
      }
    });
  }

  button.addEventListener("click", function () {
    openTerminal().catch(function (error) {
      say("Could not open a terminal: " + error);
      button.disabled = false;
    });
  });
})();
