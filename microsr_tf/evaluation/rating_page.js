(function () {
  "use strict";
  var study = JSON.parse(document.getElementById("study-data").textContent);
  var trials = study.trials, criteria = study.criteria, scale = study.scale;
  var STORE = "microsr-tf-rating-study:" + study.study_id;
  var storageOk = true;
  var state = load();  // {rater, current, ratings: {trialId: {criterionKey: 1..6, rated_at: ISO time}}}
  var active = 0;       // index of the highlighted criterion

  function $(id) { return document.getElementById(id); }

  function load() {
    var empty = { rater: "", current: 0, ratings: {} };
    try {
      var raw = window.localStorage.getItem(STORE);
      if (!raw) return empty;
      var s = JSON.parse(raw);
      if (!s || typeof s.ratings !== "object") return empty;
      s.rater = typeof s.rater === "string" ? s.rater : "";
      s.current = Math.min(Math.max(0, s.current | 0), trials.length - 1);
      return s;
    } catch (e) {
      storageOk = false;
      return empty;
    }
  }

  function save() {
    try {
      window.localStorage.setItem(STORE, JSON.stringify(state));
    } catch (e) {
      storageOk = false;
    }
    if (!storageOk) say("This browser does not keep the ratings over a reload: export them before closing the page.");
  }

  function say(text) { $("status").textContent = text; }

  function ratingOf(trialId) { return state.ratings[trialId] || {}; }

  function isComplete(trialId) {
    var r = ratingOf(trialId);
    return criteria.every(function (c) { return r[c.key] >= scale.min; });
  }

  function nRated() { return trials.filter(function (t) { return isComplete(t.id); }).length; }

  function build() {
    $("study-id").textContent = "(study " + study.study_id + ")";
    var box = $("criteria");
    criteria.forEach(function (c, ci) {
      var div = document.createElement("div");
      div.className = "criterion";
      div.id = "criterion-" + c.key;
      var h = document.createElement("h3");
      h.textContent = "(" + String.fromCharCode(97 + ci) + ") " + c.label;
      var p = document.createElement("p");
      p.textContent = c.question;
      var stars = document.createElement("div");
      stars.className = "stars";
      var lo = document.createElement("span");
      lo.className = "scale-label";
      lo.textContent = scale.min + " " + scale.low;
      stars.appendChild(lo);
      for (var v = scale.min; v <= scale.max; v++) {
        var b = document.createElement("button");
        b.type = "button";
        b.className = "star";
        b.textContent = "\u2605";
        b.dataset.criterion = c.key;
        b.dataset.value = String(v);
        b.setAttribute("aria-label", c.label + ": " + v + " of " + scale.max + " stars");
        b.addEventListener("click", (function (index, value) {
          return function (e) { e.stopPropagation(); rate(index, value); };
        })(ci, v));
        stars.appendChild(b);
      }
      var hi = document.createElement("span");
      hi.className = "scale-label";
      hi.textContent = scale.max + " " + scale.high;
      stars.appendChild(hi);
      var val = document.createElement("span");
      val.className = "value";
      val.id = "value-" + c.key;
      stars.appendChild(val);
      div.appendChild(h);
      div.appendChild(p);
      div.appendChild(stars);
      div.addEventListener("click", function () { active = ci; render(); });
      box.appendChild(div);
    });
    $("rater").value = state.rater;
    $("rater").addEventListener("input", function (e) { state.rater = e.target.value.trim(); save(); });
    $("prev").addEventListener("click", function () { go(state.current - 1); });
    $("next").addEventListener("click", function () { go(state.current + 1); });
    $("next-unrated").addEventListener("click", nextUnrated);
    $("export").addEventListener("click", exportCsv);
    document.addEventListener("keydown", onKey);
  }

  function render() {
    var t = trials[state.current];
    document.body.dataset.trial = t.id;
    $("lr-img").src = study.lr_images[t.lr];
    $("result-img").src = t.image;
    $("trial-title").textContent = "Trial " + (state.current + 1) + " of " + trials.length;
    var r = ratingOf(t.id);
    criteria.forEach(function (c, ci) {
      var div = $("criterion-" + c.key);
      div.classList.toggle("active", ci === active);
      var value = r[c.key] || 0;
      div.querySelectorAll(".star").forEach(function (b) {
        var v = Number(b.dataset.value);
        b.classList.toggle("on", v <= value);
        b.setAttribute("aria-pressed", v === value ? "true" : "false");
      });
      $("value-" + c.key).textContent = value ? value + " / " + scale.max : "not rated";
    });
    var done = nRated();
    $("progress").max = trials.length;
    $("progress").value = done;
    $("progress-text").textContent = done + " of " + trials.length + " trials rated";
    $("prev").disabled = state.current === 0;
    $("next").disabled = state.current === trials.length - 1;
  }

  function go(index) {
    if (index < 0 || index >= trials.length) return;
    state.current = index;
    active = 0;
    save();
    render();
  }

  function nextUnrated() {
    for (var k = 1; k <= trials.length; k++) {
      var i = (state.current + k) % trials.length;
      if (!isComplete(trials[i].id)) { go(i); return; }
    }
    say("All " + trials.length + " trials are rated. Enter your name and export the CSV.");
  }

  function rate(ci, value) {
    var t = trials[state.current];
    var wasComplete = isComplete(t.id);
    var r = state.ratings[t.id] || (state.ratings[t.id] = {});
    r[criteria[ci].key] = value;
    r.rated_at = new Date().toISOString();
    active = Math.min(ci + 1, criteria.length - 1);
    save();
    if (!wasComplete && isComplete(t.id)) {
      if (nRated() === trials.length) {
        say("All " + trials.length + " trials are rated. Enter your name and export the CSV.");
      } else if (state.current < trials.length - 1) {
        go(state.current + 1);
        return;
      }
    }
    render();
  }

  function onKey(e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var tag = (e.target && e.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA") {
      if (e.key === "Enter" || e.key === "Escape") e.target.blur();
      return;
    }
    var k = e.key;
    var n = Number(k);
    if (k.length === 1 && n >= scale.min && n <= scale.max) rate(active, n);
    else if (k === "a" || k === "A" || k === "ArrowUp") { active = 0; render(); }
    else if (k === "b" || k === "B" || k === "ArrowDown") { active = criteria.length - 1; render(); }
    else if (k === "ArrowRight" || k === "n" || k === "N") go(state.current + 1);
    else if (k === "ArrowLeft" || k === "p" || k === "P") go(state.current - 1);
    else if (k === "u" || k === "U") nextUnrated();
    else return;
    e.preventDefault();
  }

  function csvField(value) {
    var s = String(value);
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function exportCsv() {
    if (!state.rater) {
      say("Enter your name before exporting.");
      $("rater").focus();
      return;
    }
    var lines = [study.columns.join(",")];
    var rows = 0;
    trials.forEach(function (t) {
      var r = state.ratings[t.id];
      if (!r) return;
      var cells = study.columns.map(function (col) {
        if (col === "study_id") return study.study_id;
        if (col === "rater") return state.rater;
        if (col === "trial") return t.id;
        return r[col] === undefined ? "" : r[col];
      });
      lines.push(cells.map(csvField).join(","));
      rows++;
    });
    var slug = state.rater.replace(/[^A-Za-z0-9_-]+/g, "_").replace(/^_+|_+$/g, "") || "rater";
    var name = "ratings-" + study.study_id + "-" + slug + ".csv";
    var url = URL.createObjectURL(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }));
    var a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
    say("Exported " + rows + " rated trials of " + trials.length + " as " + name + ".");
  }

  build();
  render();
  if (!storageOk) say("This browser does not keep the ratings over a reload: export them before closing the page.");
})();
