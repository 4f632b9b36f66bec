// tasuki web UI: the few interactive parts. Every page works without this script;
// it adds the live log (server-sent events resumed by byte offset, ANSI colours), the
// runs table's refresh while something runs, bulk selection, and the Run form's
// pattern check in the browser. Text always goes in as text nodes, never as HTML.
"use strict";

(function () {
  // ---- ANSI SGR to spans ---------------------------------------------------------
  // State survives chunk boundaries: the attributes in force, and an escape sequence
  // cut by the end of a chunk.
  function AnsiRenderer(target) {
    this.target = target;
    this.pending = "";
    this.reset();
  }
  AnsiRenderer.prototype.reset = function () {
    this.bold = false; this.dim = false; this.italic = false; this.underline = false;
    this.fg = null; this.bg = null; // a number 0-15 (a class) or a CSS colour string
  };
  AnsiRenderer.prototype.colour256 = function (n) {
    if (n < 16) return n;
    if (n < 232) {
      n -= 16;
      var steps = [0, 95, 135, 175, 215, 255];
      return "rgb(" + steps[Math.floor(n / 36)] + "," + steps[Math.floor(n / 6) % 6] + "," + steps[n % 6] + ")";
    }
    var g = 8 + (n - 232) * 10;
    return "rgb(" + g + "," + g + "," + g + ")";
  };
  AnsiRenderer.prototype.sgr = function (params) {
    var codes = params === "" ? [0] : params.split(/[;:]/).map(function (p) { return p === "" ? 0 : parseInt(p, 10); });
    for (var i = 0; i < codes.length; i++) {
      var c = codes[i];
      if (c === 0) this.reset();
      else if (c === 1) this.bold = true;
      else if (c === 2) this.dim = true;
      else if (c === 3) this.italic = true;
      else if (c === 4) this.underline = true;
      else if (c === 22) { this.bold = false; this.dim = false; }
      else if (c === 23) this.italic = false;
      else if (c === 24) this.underline = false;
      else if (c >= 30 && c <= 37) this.fg = c - 30;
      else if (c >= 90 && c <= 97) this.fg = c - 90 + 8;
      else if (c === 39) this.fg = null;
      else if (c >= 40 && c <= 47) this.bg = c - 40;
      else if (c >= 100 && c <= 107) this.bg = c - 100 + 8;
      else if (c === 49) this.bg = null;
      else if (c === 38 || c === 48) {
        var colour = null;
        if (codes[i + 1] === 5 && i + 2 < codes.length) {
          colour = this.colour256(codes[i + 2]); i += 2;
        } else if (codes[i + 1] === 2 && i + 4 < codes.length) {
          colour = "rgb(" + codes[i + 2] + "," + codes[i + 3] + "," + codes[i + 4] + ")"; i += 4;
        }
        if (c === 38) this.fg = colour; else this.bg = colour;
      }
    }
  };
  AnsiRenderer.prototype.emit = function (text) {
    if (text === "") return;
    var plain = !this.bold && !this.dim && !this.italic && !this.underline && this.fg === null && this.bg === null;
    if (plain) { this.target.appendChild(document.createTextNode(text)); return; }
    var span = document.createElement("span");
    var cls = [];
    if (this.bold) cls.push("a-b");
    if (this.dim) cls.push("a-d");
    if (this.italic) cls.push("a-i");
    if (this.underline) cls.push("a-u");
    if (typeof this.fg === "number") cls.push("a-f" + this.fg); else if (this.fg) span.style.color = this.fg;
    if (typeof this.bg === "number") cls.push("a-g" + this.bg); else if (this.bg) span.style.backgroundColor = this.bg;
    span.className = cls.join(" ");
    span.textContent = text;
    this.target.appendChild(span);
  };
  AnsiRenderer.prototype.write = function (chunk) {
    var s = this.pending + chunk;
    this.pending = "";
    var out = "";
    var i = 0;
    while (i < s.length) {
      var ch = s.charAt(i);
      if (ch === "\r") { i++; continue; } // CR LF as LF; a lone CR (progress bars) dropped
      if (ch !== "\x1b") { out += ch; i++; continue; }
      if (i + 1 >= s.length) { this.pending = s.slice(i); break; }
      var kind = s.charAt(i + 1);
      if (kind === "[") { // CSI: parameters, then a final byte 0x40-0x7e
        var j = i + 2;
        while (j < s.length && !/[\x40-\x7e]/.test(s.charAt(j))) j++;
        if (j >= s.length) { this.pending = s.slice(i); break; }
        if (s.charAt(j) === "m") { this.emit(out); out = ""; this.sgr(s.slice(i + 2, j)); }
        i = j + 1; // other CSI (cursor moves, erase) have no meaning in a log: dropped
      } else if (kind === "]") { // OSC (titles, links): up to BEL or ST, dropped
        var end = s.indexOf("\x07", i);
        var st = s.indexOf("\x1b\\", i);
        if (end < 0 && st < 0) { this.pending = s.slice(i); break; }
        if (end < 0 || (st >= 0 && st < end)) i = st + 2; else i = end + 1;
      } else {
        i += 2;
      }
    }
    if (this.pending.length > 4096) { out += this.pending; this.pending = ""; }
    this.emit(out);
  };

  // ---- the live log --------------------------------------------------------------
  function liveLog(pre) {
    var url = pre.getAttribute("data-stream");
    var follow = document.getElementById("follow");
    var state = document.getElementById("log-state");
    var renderer = new AnsiRenderer(pre);
    var wasFinal = pre.getAttribute("data-final") === "true";
    // A fresh page starts at byte 0; the browser resumes with Last-Event-ID itself.
    var source = new EventSource(url + "?from=0");
    function scroll() { if (follow && follow.checked) pre.scrollTop = pre.scrollHeight; }
    source.onmessage = function (e) {
      renderer.write(JSON.parse(e.data));
      pre.setAttribute("data-offset", e.lastEventId);
      scroll();
    };
    source.addEventListener("end", function (e) {
      source.close();
      renderer.write("");
      if (state) state.textContent = "complete (" + e.data + ")";
      pre.setAttribute("data-ended", e.data);
      // The page was drawn while the run was live: draw it again for its end.
      if (!wasFinal) setTimeout(function () { window.location.reload(); }, 800);
    });
    source.addEventListener("failure", function (e) {
      source.close();
      if (state) state.textContent = "log unavailable: " + e.data;
    });
    source.onerror = function () {
      if (state && source.readyState === EventSource.CONNECTING) state.textContent = "reconnecting…";
    };
    source.onopen = function () { if (state && !wasFinal) state.textContent = "live"; };
    if (follow) follow.addEventListener("change", scroll);
  }

  // ---- runs table: refresh while something is active, keep the selection ---------
  function refreshRuns(table) {
    var timer = null;
    function picked() {
      var ids = {};
      document.querySelectorAll("input.pick:checked").forEach(function (c) { ids[c.value] = true; });
      return ids;
    }
    function tick() {
      fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          var fresh = doc.getElementById("runs-body");
          var freshTable = doc.getElementById("runs");
          var body = document.getElementById("runs-body");
          if (!fresh || !body || !freshTable) return;
          var keep = picked();
          body.replaceWith(document.importNode(fresh, true));
          document.querySelectorAll("input.pick").forEach(function (c) { if (keep[c.value]) c.checked = true; });
          table.setAttribute("data-active", freshTable.getAttribute("data-active"));
          schedule();
        })
        .catch(function () { schedule(); });
    }
    function schedule() {
      clearTimeout(timer);
      if (table.getAttribute("data-active") === "true") timer = setTimeout(tick, 2000);
    }
    schedule();
  }

  // ---- one run: its status, facts and attempts drawn again while it is live ------
  // (the action forms are left alone, so nothing is swapped under a click; the log's
  // end draws the whole page again).
  function refreshRun() {
    var box = document.getElementById("attempts-box");
    if (!box || box.getAttribute("data-final") === "true") return;
    var ids = ["run-status", "facts", "attempts-box"];
    function tick() {
      fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          ids.forEach(function (id) {
            var fresh = doc.getElementById(id);
            var old = document.getElementById(id);
            if (fresh && old) old.replaceWith(document.importNode(fresh, true));
          });
          var now = document.getElementById("attempts-box");
          if (now && now.getAttribute("data-final") !== "true") setTimeout(tick, 2000);
        })
        .catch(function () { setTimeout(tick, 2000); });
    }
    setTimeout(tick, 2000);
  }

  function selectAll() {
    var all = document.getElementById("select-all");
    if (!all) return;
    all.addEventListener("change", function () {
      document.querySelectorAll("input.pick").forEach(function (c) { c.checked = all.checked; });
    });
  }

  // ---- the Run form: the job's patterns checked in the browser ------------------
  // A Rust regex is not always a valid JavaScript one; a pattern the browser cannot
  // read is left to the server's check rather than set (an invalid `pattern` attribute
  // would only log an error and check nothing).
  function patterns() {
    document.querySelectorAll("input[data-pattern]").forEach(function (input) {
      var p = input.getAttribute("data-pattern");
      try {
        new RegExp("^(?:" + p + ")$", "v");
        input.setAttribute("pattern", p);
      } catch (e) {
        input.removeAttribute("data-pattern");
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var pre = document.getElementById("log");
    if (pre && pre.getAttribute("data-stream")) liveLog(pre);
    var table = document.getElementById("runs");
    if (table) refreshRuns(table);
    refreshRun();
    selectAll();
    patterns();
  });
})();
