"""The labelling page in a real headless browser (Debian's chromium driven by Playwright): label
pairs by clicks and keys, go back and change one, reload, find the progress kept, export, and get
exactly what was clicked. Skipped, saying why, when chromium or playwright cannot be had.

``RLHF_DOCS_SCREENSHOT=1`` also writes docs/img/labelling-music.png (with a briefly trained prior,
so the counterpoint looks like counterpoint)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reward_models.data import load_preferences
from apps.labelling.cli import export_pairs_main, label_main
from apps.labelling.loop import serving, tiny_prior
from apps.labelling.pairs import read_pairs

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token"
DOCS_SHOT = REPO / "docs" / "img" / "labelling-music.png"


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (Debian package chromium)"
    if importlib.util.find_spec("playwright") is None:
        return f"the python package playwright is not installed in {sys.prefix}"
    return None


@pytest.fixture(scope="module")
def browser():
    """Chromium via Playwright; tries scripts/install_browser.sh once (idempotent) when either is
    missing, unless RLHF_INSTALL_BROWSER=0; skips with the reason when it still cannot run."""
    why = _missing()
    if why and os.environ.get("RLHF_INSTALL_BROWSER", "1") != "0":
        r = subprocess.run(["bash", str(REPO / "scripts" / "install_browser.sh"), sys.prefix], capture_output=True, text=True, timeout=900)
        importlib.invalidate_caches()
        why = _missing()
        if why:
            why += f"; scripts/install_browser.sh said: {r.stdout.strip()[-300:]}"
    if why:
        pytest.skip(f"browser test needs chromium and playwright: {why}")
    from playwright.sync_api import Error, sync_playwright

    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
    except Error as e:
        pw.stop()
        pytest.skip(f"chromium at {CHROMIUM} does not start under Playwright here: {str(e).splitlines()[0]}")
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    steps = 150 if os.environ.get("RLHF_DOCS_SCREENSHOT") else 0
    prior = tiny_prior(root / "prior", steps=steps)
    assert export_pairs_main(["--model", str(prior), "--out", str(root / "export"), "--pairs-per-prompt", "1", "--no-scores", "--seed", "1"]) == 0
    return root / "export" / "pairs.jsonl"


def test_label_by_clicks_and_keys_reload_and_export(browser, pairs_path, tmp_path):
    pairs = read_pairs(pairs_path)
    db = tmp_path / "labels.sqlite"
    problems = []
    from playwright.sync_api import expect

    with serving(pairs_path, db, token=TOKEN) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.goto(f"{url}/?token={TOKEN}")
        page.fill("#rater", "alice")
        page.click("#start")

        # Waits go through locators: the page's CSP forbids eval, which wait_for_function needs.
        body = page.locator("body")

        def done(n):
            expect(page.locator("#progress")).to_have_attribute("data-done", str(n), timeout=10_000)
            expect(body).to_have_attribute("data-busy", "0", timeout=10_000)

        def shown():
            expect(body).to_have_attribute("data-pair-id", re.compile(r".+"), timeout=10_000)
            return body.get_attribute("data-pair-id")

        done(0)
        assert page.inner_text("#progress") == f"0 of {len(pairs)}"
        # both piano rolls are drawn (non-blank pixels) and the texts are the pair's
        first = pairs[0]
        assert shown() == first.pair_id
        assert page.inner_text("#text-a") == first.display("a") and page.inner_text("#prompt") == first.display("prompt")
        inked = page.evaluate("""() => ['roll-a', 'roll-b'].map(id => {
            const c = document.getElementById(id), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })""")
        assert min(inked) > 500, inked
        page.click("#play-a")  # Web Audio: schedules oscillators, must not throw
        assert page.evaluate("typeof AudioContext") == "function"

        clicked = {}
        actions = [("click", "#btn-A", "A"), ("key", "b", "B"), ("click", "#btn-tie", "tie"), ("key", "s", "skip"), ("key", "a", "A")]
        for n, (how, what, choice) in enumerate(actions, 1):
            pid = shown()
            if how == "click":
                page.click(what)
            else:
                page.keyboard.press(what)
            done(n)
            clicked[pid] = choice
        # back (U) to the last pair: its label is highlighted; change it with a key
        last = shown()
        page.keyboard.press("u")
        expect(body).not_to_have_attribute("data-pair-id", last)
        expect(body).to_have_attribute("data-busy", "0")
        back_to = shown()
        assert clicked[back_to] == "A" and "current" in page.get_attribute("#btn-A", "class")
        page.keyboard.press("t")
        expect(body).to_have_attribute("data-pair-id", last)
        expect(body).to_have_attribute("data-busy", "0")
        clicked[back_to] = "tie"
        assert page.inner_text("#progress") == f"5 of {len(pairs)}"

        # reload: the name comes back, labelling resumes where it was
        page.reload()
        done(5)
        assert page.input_value("#rater") == "alice" and shown() == pairs[5].pair_id
        assert page.inner_text("#progress") == f"5 of {len(pairs)}"
        page.screenshot(path=str(tmp_path / "labelling-music.png"))
        if os.environ.get("RLHF_DOCS_SCREENSHOT"):
            DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "labelling-music.png", DOCS_SHOT)
        # another rater in another tab has their own progress
        other = browser.new_page()
        other.goto(f"{url}/?token={TOKEN}")
        other.evaluate("localStorage.clear()")
        other.fill("#rater", "bob")
        other.click("#start")
        expect(other.locator("#progress")).to_have_attribute("data-done", "0")
        other.close()
        page.close()
    assert not problems, problems
    out = tmp_path / "labels.jsonl"
    assert label_main(["export", "--pairs", str(pairs_path), "--db", str(db), "--out", str(out)]) == 0
    by_id = {p.pair_id: p for p in pairs}
    got = {r.pair_id.rsplit("/", 1)[0]: r for r in load_preferences(out)}
    want = {pid: c for pid, c in clicked.items() if c != "skip"}
    assert set(got) == set(want) and all(r.rater_id == "alice" for r in got.values())
    for pid, choice in want.items():
        p, r = by_id[pid], got[pid]
        assert (r.chosen, r.rejected, r.label) == ((p.b, p.a, "chosen") if choice == "B" else (p.a, p.b, "tie" if choice == "tie" else "chosen"))
