"""The labelling web app: labels posted at once from many threads are all stored, a server killed
with SIGKILL loses no acknowledged label, hostile input gets a 4xx and changes nothing, and
`rlhf label export` writes exactly what was stored."""

import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from reward_models.data import load_preferences
from apps.labelling.cli import label_main
from apps.labelling.loop import serving
from apps.labelling.pairs import CandidatePair, make_pair_id, midi_name, pairs_jsonl
from apps.labelling.store import LabelStore

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"


def music_pairs(n):
    """``n`` first-species pairs over one cantus, as export-pairs writes them (no model needed)."""
    cf = [62, 65, 64, 62, 67, 65, 69, 67, 65, 64, 62]
    out = []
    for i in range(n):
        cps = [[c + (3, 4, 7, 8, 9, 12)[(i + k + j) % 6] for j, c in enumerate(cf)] for k in (0, 1)]
        prompt = "<bos> <cf_below> " + " ".join(f"cf_{m}" for m in cf) + f" <sep> #{i}"
        a, b = (" " + " ".join(f"iv_+{p - c}" for p, c in zip(cp, cf)) + " <eos>" for cp in cps)
        pid = make_pair_id(prompt, a, b, ["test@0"])
        voices = lambda cp: [{"role": "counterpoint", "pitches": cp, "durations": [4.0] * len(cp)},  # noqa: E731
                             {"role": "cantus", "pitches": cf, "durations": [4.0] * len(cf)}]
        meta = {"domain": "music", "prompt_name": f"fux-d/below-{i}",
                "display": {"prompt": "cantus: " + " ".join(map(midi_name, cf)), "a": " ".join(map(midi_name, cps[0])), "b": " ".join(map(midi_name, cps[1]))},
                "notes": {"a": voices(cps[0]), "b": voices(cps[1])}, "task": {"mode": "first_species", "cantus_position": "below", "final": 2}}
        out.append(CandidatePair(pid, prompt, a, b, f"fux-d/below-{i}#{pid}", meta))
    return out


@pytest.fixture()
def pairs_file(tmp_path):
    pairs = music_pairs(30)
    path = tmp_path / "pairs.jsonl"
    path.write_text(pairs_jsonl(pairs))
    return path, pairs


def call(base, method, path, body=None, headers=None, raw=None, token=TOKEN, host=None):
    """(status, parsed JSON or text, headers) of one request on a fresh connection."""
    m = re.match(r"http://([^:/]+):(\d+)", base)
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=30)
    hdrs = {"Content-Type": "application/json", **({"X-Access-Token": token} if token else {}), **(headers or {})}
    if host is not None:
        hdrs["Host"] = host
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    data = data.encode() if isinstance(data, str) else data  # one send(): no Nagle/delayed-ACK stall
    try:
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        text = r.read().decode("utf-8", "replace")
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = text
        return r.status, parsed, dict(r.getheaders())
    finally:
        conn.close()


def snapshot(db):
    store = LabelStore(db)
    return store.labels(), store.counts()


def test_labels_posted_concurrently_are_all_stored(pairs_file, tmp_path):
    path, pairs = pairs_file
    db = tmp_path / "labels.sqlite"
    errors = []
    with serving(path, db, token=TOKEN) as url:
        def rater(k):
            for i, p in enumerate(pairs[:20]):
                choice = ("A", "B", "tie", "skip")[(i + k) % 4]
                status, body, _ = call(url, "POST", "/api/labels", {"pair_id": p.pair_id, "rater": f"rater{k}", "choice": choice})
                if status != 200 or body["label"]["choice"] != choice:
                    errors.append((k, i, status, body))

        def relabel(k):  # the same (pair, rater) from several threads: one row, every revision counted
            for i in range(10):
                status, _, _ = call(url, "POST", "/api/labels", {"pair_id": pairs[0].pair_id, "rater": "same", "choice": "AB"[(i + k) % 2]})
                if status != 200:
                    errors.append(("same", k, i, status))

        threads = [threading.Thread(target=rater, args=(k,)) for k in range(6)] + [threading.Thread(target=relabel, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status, progress, _ = call(url, "GET", "/api/progress?rater=rater2")
    assert not errors, errors[:3]
    assert progress == {"done": 20, "labelled": 15, "skipped": 5, "total": 30}
    store = LabelStore(db)
    labels = {(lb.pair_id, lb.rater): lb for lb in store.labels()}
    assert len(labels) == 6 * 20 + 1 and store.counts()["events"] == 6 * 20 + 30
    for k in range(6):
        for i, p in enumerate(pairs[:20]):
            assert labels[p.pair_id, f"rater{k}"].choice == ("A", "B", "tie", "skip")[(i + k) % 4]
    same = labels[pairs[0].pair_id, "same"]
    assert same.revision == 30 and same.created_at <= same.updated_at


def test_next_pair_relabel_and_export(pairs_file, tmp_path, capsys):
    path, pairs = pairs_file
    db = tmp_path / "labels.sqlite"
    with serving(path, db, token=TOKEN) as url:
        status, nxt, _ = call(url, "GET", "/api/next?rater=ann")
        assert status == 200 and nxt["pair"]["pair_id"] == pairs[0].pair_id and nxt["progress"]["done"] == 0
        assert nxt["pair"]["a"]["notes"][1]["role"] == "cantus" and "files" not in json.dumps(nxt)
        for p, choice in zip(pairs[:4], ["A", "B", "tie", "skip"]):
            assert call(url, "POST", "/api/labels", {"pair_id": p.pair_id, "rater": "ann", "choice": choice})[0] == 200
        status, nxt, _ = call(url, "GET", "/api/next?rater=ann")
        assert nxt["pair"]["pair_id"] == pairs[4].pair_id and nxt["progress"] == {"done": 4, "labelled": 3, "skipped": 1, "total": 30}
        # go back and change the first label: one row, revision 2, first time kept
        status, back, _ = call(url, "GET", f"/api/pairs/{pairs[0].pair_id}?rater=ann")
        assert back["label"]["choice"] == "A"
        status, again, _ = call(url, "POST", "/api/labels", {"pair_id": pairs[0].pair_id, "rater": "ann", "choice": "B"})
        assert again["label"]["revision"] == 2 and again["label"]["created_at"] == back["label"]["created_at"]
        assert call(url, "POST", "/api/labels", {"pair_id": pairs[5].pair_id, "rater": "bo.b@example.org", "choice": "A"})[0] == 200
    out = tmp_path / "labels.jsonl"
    assert label_main(["export", "--pairs", str(path), "--db", str(db), "--out", str(out)]) == 0
    assert "wrote 4 labels (1 skips left out)" in capsys.readouterr().out
    recs = load_preferences(out)
    got = [(r.pair_id, r.chosen, r.rejected, r.label, r.rater_id) for r in recs]
    assert got == [(f"{pairs[0].pair_id}/ann", pairs[0].b, pairs[0].a, "chosen", "ann"),
                   (f"{pairs[1].pair_id}/ann", pairs[1].b, pairs[1].a, "chosen", "ann"),
                   (f"{pairs[2].pair_id}/ann", pairs[2].a, pairs[2].b, "tie", "ann"),
                   (f"{pairs[5].pair_id}/bo.b@example.org", pairs[5].a, pairs[5].b, "chosen", "bo.b@example.org")]
    assert all(r.source == p.source for r, p in zip(recs, [pairs[0], pairs[1], pairs[2], pairs[5]]))
    assert label_main(["export", "--pairs", str(path), "--db", str(db), "--out", str(tmp_path / "ann.jsonl"), "--rater", "ann"]) == 0
    assert len(load_preferences(tmp_path / "ann.jsonl")) == 3
    # a pairs file that does not match the database, an existing output: refused, nothing written
    other = tmp_path / "other.jsonl"
    other.write_text(pairs_jsonl(music_pairs(40)[30:]))
    assert label_main(["export", "--pairs", str(other), "--db", str(db), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "not in the pairs file" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
    assert label_main(["export", "--pairs", str(path), "--db", str(db), "--out", str(out)]) == 2


HUGE = json.dumps({"pair_id": "x", "rater": "a" * 2_000_000, "choice": "A"})
HOSTILE = [
    ("POST", "/api/labels", {"pair_id": 123, "rater": "eve", "choice": "A"}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "PID", "rater": ["eve"], "choice": "A"}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "PID", "rater": "eve", "choice": 1}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "PID", "rater": "eve", "choice": "C"}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "PID", "rater": "eve", "choice": None}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "PID", "rater": "eve"}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "PID", "rater": "eve", "choice": "A", "path": "/etc/passwd"}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "PID", "rater": "eve'; DROP TABLE labels; --", "choice": "A"}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "x' OR '1'='1", "rater": "eve", "choice": "A"}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "PID", "rater": "", "choice": "A"}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "PID", "rater": "e" * 65, "choice": "A"}, None, {}, 422),
    ("POST", "/api/labels", {"pair_id": "deadbeefdeadbeef", "rater": "eve", "choice": "A"}, None, {}, 404),
    ("POST", "/api/labels", None, HUGE, {}, 413),
    ("POST", "/api/labels", None, "not json at all", {}, 422),
    ("POST", "/api/labels", None, "pair_id=PID&rater=eve&choice=A", {"Content-Type": "application/x-www-form-urlencoded"}, 422),
    ("POST", "/api/labels", None, '[{"pair_id": "PID"}]', {}, 422),
    ("PUT", "/api/labels", {"pair_id": "PID", "rater": "eve", "choice": "A"}, None, {}, 405),
    ("DELETE", "/api/labels?rater=ann", None, None, {}, 405),
    ("GET", "/api/next?rater=%27%20OR%20%271%27%3D%271", None, None, {}, 422),
    ("GET", "/api/next", None, None, {}, 422),
    ("GET", "/api/pairs/..%2F..%2Fetc%2Fpasswd?rater=eve", None, None, {}, 404),
    ("GET", "/api/pairs/1;DROP?rater=eve", None, None, {}, 422),
    ("GET", "/static/..%2F..%2F..%2Fetc%2Fpasswd", None, None, {}, 404),
    ("GET", "/static/../server.py", None, None, {}, 404),
    ("GET", "/docs", None, None, {}, 404),
]


def test_hostile_input_gets_4xx_and_changes_nothing(pairs_file, tmp_path):
    path, pairs = pairs_file
    db = tmp_path / "labels.sqlite"
    with serving(path, db, token=TOKEN) as url:
        assert call(url, "POST", "/api/labels", {"pair_id": pairs[0].pair_id, "rater": "ann", "choice": "A"})[0] == 200
        before = snapshot(db)
        for method, route, body, raw, headers, want in HOSTILE:
            if isinstance(body, dict) and body.get("pair_id") == "PID":
                body = {**body, "pair_id": pairs[1].pair_id}
            status, answer, hdrs = call(url, method, route, body=body, raw=raw, headers=headers)
            assert status == want, (method, route, body if raw is None else raw[:80], status, answer)
            assert "'none'" in hdrs.get("content-security-policy", "") and hdrs.get("x-content-type-options") == "nosniff"
        # a body sent in chunks, over the limit, without a Content-Length
        m = re.match(r"http://([^:/]+):(\d+)", url)
        conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=30)
        conn.request("POST", "/api/labels", body=iter([b"{" + b" " * 8192] * 4), headers={"X-Access-Token": TOKEN, "Content-Type": "application/json"},
                     encode_chunked=True)
        assert conn.getresponse().status == 413
        conn.close()
        # the token: missing or wrong is 401; in the query it works; the page itself needs none
        ok = {"pair_id": pairs[2].pair_id, "rater": "eve", "choice": "A"}
        assert call(url, "POST", "/api/labels", ok, token=None)[0] == 401
        assert call(url, "POST", "/api/labels", ok, token="wrong-token-xxxxxxxx")[0] == 401
        assert call(url, "GET", "/api/next?rater=eve", token=None)[0] == 401
        assert call(url, "GET", "/api/next?rater=eve", token=None, headers={"X-Access-Token": TOKEN[:-1]})[0] == 401
        # DNS rebinding: a foreign Host header is refused even with the token
        assert call(url, "POST", "/api/labels", ok, host="evil.example:80")[0] == 400
        assert snapshot(db) == before
        status, page, hdrs = call(url, "GET", "/", token=None)
        assert status == 200 and "<canvas" in page and hdrs["content-type"].startswith("text/html")
        assert call(url, "GET", "/static/app.js", token=None)[2]["content-type"].startswith("text/javascript")
        assert call(url, "GET", f"/api/next?rater=eve&token={TOKEN}", token=None)[0] == 200
    # the database is intact and usable
    labels, counts = snapshot(db)
    assert counts == {"labels": 1, "events": 1} and labels[0].rater == "ann"


def test_killed_server_loses_no_acknowledged_label(pairs_file, tmp_path):
    path, pairs = pairs_file
    db = tmp_path / "labels.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "apps.labelling.cli", "label", "serve", "--pairs", str(path), "--db", str(db),
                             "--port", "0", "--token", TOKEN], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", line)
            if m:
                url = m.group(1)
                break
        assert url, proc.stderr.read()
        acked = {}  # (pair, rater) -> (revision, choice) of the last acknowledged post
        lock = threading.Lock()
        stop = threading.Event()

        def poster(k):
            i = 0
            while not stop.is_set():
                p = pairs[(i * 7 + k) % len(pairs)]
                choice = "AB"[(i + k) % 2]
                try:
                    status, body, _ = call(url, "POST", "/api/labels", {"pair_id": p.pair_id, "rater": f"r{k}", "choice": choice})
                except OSError:  # the server is gone
                    return
                if status == 200:
                    with lock:
                        acked[p.pair_id, f"r{k}"] = (body["label"]["revision"], choice)
                i += 1

        threads = [threading.Thread(target=poster, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 45 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-session: posts are in flight
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert len(acked) >= 45
    stored = {(lb.pair_id, lb.rater): lb for lb in LabelStore(db).labels()}
    for key, (revision, choice) in acked.items():
        lb = stored[key]  # every acknowledged label survived the kill
        assert lb.revision >= revision and (lb.revision > revision or lb.choice == choice), (key, lb, revision, choice)


# --------------------------------------------------------------------------- at scale: 8 raters x 500 labels

RATERS, PER_RATER = 8, 500


@pytest.fixture()
def big_pairs_file(tmp_path):
    """500 pairs (built in well under a second), so each rater labels 500 distinct pairs."""
    pairs = music_pairs(PER_RATER)
    path = tmp_path / "pairs.jsonl"
    path.write_text(pairs_jsonl(pairs))
    return path, pairs


@contextmanager
def server_process(pairs_path, db, log):
    """`rlhf label serve` as a real process on a free port; yields (process, base URL). Its
    stderr goes to ``log`` (no pipe to fill); the process is killed on the way out if still up."""
    with open(log, "a") as err:
        proc = subprocess.Popen([sys.executable, "-m", "apps.labelling.cli", "label", "serve", "--pairs", str(pairs_path), "--db", str(db),
                                 "--port", "0", "--token", TOKEN], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", line)
            if m:
                url = m.group(1)
                break
        assert url, Path(log).read_text()
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stdout.close()


class Client:
    """One rater's keep-alive HTTP/1.1 connection (as a browser tab keeps one), so the test
    measures the server, not TCP set-up. A connection the server closed while idle (uvicorn's
    keep-alive timeout) is reopened before the next request, as urllib3 and browsers do; a
    request that fails is never retried (the caller decides what a failure means)."""

    def __init__(self, base):
        m = re.match(r"http://([^:/]+):(\d+)", base)
        self.conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=60)
        self.headers = {"Content-Type": "application/json", "X-Access-Token": TOKEN}

    def __call__(self, method, path, body=None):
        sock = self.conn.sock
        if sock is not None and select.select([sock], [], [], 0)[0]:  # EOF (or junk) waiting: the server hung up
            self.conn.close()  # the next request connects afresh
        self.conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=self.headers)
        r = self.conn.getresponse()
        return r.status, json.loads(r.read())

    def close(self):
        self.conn.close()


def run_raters(rater) -> None:
    """``rater(k)`` for each of the RATERS raters at once, in threads; waits for all of them."""
    threads = [threading.Thread(target=rater, args=(k,)) for k in range(RATERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)  # a bound, not a timing assertion: a hung server fails the test instead of the run
    assert not any(t.is_alive() for t in threads), "raters still posting after 10 minutes"


def choice_of(i, k):
    return ("A", "B", "tie", "skip")[(i + k) % 4]


def stored_by_rater(db):
    """{rater: {pair_id: Label}} and the number of events, read straight from the SQLite file."""
    store = LabelStore(db)
    out = {}
    for lb in store.labels():
        assert lb.pair_id not in out.setdefault(lb.rater, {})  # the primary key already forbids it
        out[lb.rater][lb.pair_id] = lb
    return out, store.counts()["events"]


def assert_all_stored_exactly_once(db, pairs):
    """Exactly RATERS x PER_RATER labels, each (rater, pair) once, posted once, with its choice."""
    stored, events = stored_by_rater(db)
    assert sorted(stored) == [f"r{k}" for k in range(RATERS)]
    assert sum(map(len, stored.values())) == RATERS * PER_RATER and events == RATERS * PER_RATER
    for k in range(RATERS):
        got = {pid: (lb.choice, lb.revision) for pid, lb in stored[f"r{k}"].items()}
        assert got == {p.pair_id: (choice_of(i, k), 1) for i, p in enumerate(pairs)}, f"r{k}"


@pytest.mark.integration
def test_eight_raters_post_five_hundred_labels_each_to_a_real_server(big_pairs_file, tmp_path):
    """8 raters post 500 labels each at once, over keep-alive connections, to a real `rlhf label
    serve` process: all 4,000 are acknowledged and stored exactly once with the posted choice
    (synchronous=FULL: one fsync per label)."""
    path, pairs = big_pairs_file
    db = tmp_path / "labels.sqlite"
    errors = []
    with server_process(path, db, tmp_path / "server.log") as (proc, url):
        def rater(k):
            client = Client(url)
            try:
                for i, p in enumerate(pairs):
                    choice = choice_of(i, k)
                    status, body = client("POST", "/api/labels", {"pair_id": p.pair_id, "rater": f"r{k}", "choice": choice})
                    if status != 200 or (body["label"]["choice"], body["label"]["revision"], body["progress"]["done"]) != (choice, 1, i + 1):
                        errors.append((k, i, status, body))
                        return
            except Exception as e:  # noqa: BLE001 - reported below, not lost in the thread
                errors.append((k, repr(e)))
            finally:
                client.close()

        run_raters(rater)
        status, progress, _ = call(url, "GET", "/api/progress?rater=r3")
        proc.terminate()
        proc.wait(30)
    assert not errors, errors[:3]
    assert status == 200 and progress == {"done": PER_RATER, "labelled": PER_RATER * 3 // 4, "skipped": PER_RATER // 4, "total": PER_RATER}
    assert_all_stored_exactly_once(db, pairs)


@pytest.mark.integration
def test_server_killed_amid_eight_raters_loses_no_acknowledged_label(big_pairs_file, tmp_path):
    """8 raters post continuously; once 1,500 labels are acknowledged the server gets SIGKILL.
    Every acknowledged label is in the database with its choice, and the only label stored
    beyond them is, per rater, the one post that got no answer. A new server on the same file
    then takes each rater's remainder (each asks the server what it already has, as the page
    does): 4,000 labels, each stored and posted exactly once."""
    path, pairs = big_pairs_file
    db = tmp_path / "labels.sqlite"
    log = tmp_path / "server.log"
    acked = [{} for _ in range(RATERS)]  # per rater: pair_id -> acknowledged choice
    unanswered = [None] * RATERS  # per rater: the pair whose post failed when the server died
    errors = []
    with server_process(path, db, log) as (proc, url):
        def poster(k):
            client = Client(url)
            try:
                for i, p in enumerate(pairs):
                    choice = choice_of(i, k)
                    try:
                        status, body = client("POST", "/api/labels", {"pair_id": p.pair_id, "rater": f"r{k}", "choice": choice})
                    except (OSError, http.client.HTTPException):  # the server is gone: this post may or may not be stored
                        unanswered[k] = p.pair_id
                        return
                    if status != 200 or body["label"]["choice"] != choice:
                        errors.append((k, i, status, body))
                        return
                    acked[k][p.pair_id] = choice
            except Exception as e:  # noqa: BLE001
                errors.append((k, repr(e)))
            finally:
                client.close()

        threads = [threading.Thread(target=poster, args=(k,)) for k in range(RATERS)]
        for t in threads:
            t.start()
        while sum(map(len, acked)) < 1500 and any(t.is_alive() for t in threads):
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # mid-session: every rater has a post in flight
        proc.wait(30)
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a rater still waiting 2 minutes after the kill"
    assert not errors, (errors[:3], log.read_text()[-2000:])
    n_acked = sum(map(len, acked))
    assert 1500 <= n_acked < RATERS * PER_RATER, n_acked
    stored, events = stored_by_rater(db)
    for k in range(RATERS):
        mine = stored.get(f"r{k}", {})
        for pid, choice in acked[k].items():  # every acknowledged label survived the kill
            assert pid in mine and (mine[pid].choice, mine[pid].revision) == (choice, 1), (k, pid)
        assert set(mine) - set(acked[k]) <= {unanswered[k]}, (k, set(mine) - set(acked[k]), unanswered[k])
    assert events == sum(map(len, stored.values()))  # no post logged twice

    # restart on the same database; each rater resumes from what the server says it has
    with server_process(path, db, log) as (proc, url):
        def resume(k):
            client = Client(url)
            try:
                status, body = client("GET", f"/api/labels?rater=r{k}")
                have = {lb["pair_id"]: lb["choice"] for lb in body["labels"]}
                if status != 200 or have != {pid: lb.choice for pid, lb in stored.get(f"r{k}", {}).items()}:
                    errors.append((k, "resume", status, len(have)))
                    return
                for i, p in enumerate(pairs):
                    if p.pair_id in have:
                        continue
                    choice = choice_of(i, k)
                    status, body = client("POST", "/api/labels", {"pair_id": p.pair_id, "rater": f"r{k}", "choice": choice})
                    if status != 200 or (body["label"]["choice"], body["label"]["revision"]) != (choice, 1):
                        errors.append((k, i, status, body))
                        return
            except Exception as e:  # noqa: BLE001
                errors.append((k, repr(e)))
            finally:
                client.close()

        run_raters(resume)
        proc.terminate()
        proc.wait(30)
    assert not errors, (errors[:3], log.read_text()[-2000:])
    assert_all_stored_exactly_once(db, pairs)


def test_serve_refuses_unsafe_settings(pairs_file, tmp_path, capsys):
    path, _ = pairs_file
    assert label_main(["serve", "--pairs", str(path), "--db", str(tmp_path / "l.sqlite"), "--host", "0.0.0.0"]) == 2
    assert "give --token" in capsys.readouterr().err
    assert label_main(["serve", "--pairs", str(path), "--db", str(tmp_path / "l.sqlite"), "--token", "short"]) == 2
    assert label_main(["serve", "--pairs", str(tmp_path / "none.jsonl"), "--db", str(tmp_path / "l.sqlite")]) == 2
    assert "pairs file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"pair_id": "a b", "prompt": "", "chosen": "x", "rejected": "y"}\n')
    assert label_main(["serve", "--pairs", str(bad), "--db", str(tmp_path / "l.sqlite")]) == 2
    assert "bad.jsonl:1: pair_id" in capsys.readouterr().err
    assert label_main(["serve", "--pairs", str(path), "--db", str(tmp_path)]) == 2
    assert label_main(["bogus"]) == 2


def test_active_serving_asks_the_most_informative_pair(tmp_path):
    """With --active, /api/next is the unlabelled pair of largest EIG under q(z | the rater's
    labels) — the same pair as a naive loop over the candidates with the same z draws — and a
    labelled pair is never served again."""
    import torch

    from apps.labelling.active import ActiveChooser
    from reward_models.active import expected_information_gain
    from reward_models.backbone import build_backbone
    from reward_models.vpl import build_vpl
    from rlhf.models import ModelConfig
    from tasks.counterpoint.tokens import build_codec

    pairs = [CandidatePair(p.pair_id, p.prompt.split(" #")[0], p.a, p.b, p.source, p.metadata) for p in music_pairs(6)]  # the task's tokens only
    path = tmp_path / "pairs.jsonl"
    path.write_text(pairs_jsonl(pairs))
    tok = build_codec("first_species").tokenizer
    torch.manual_seed(0)
    vpl = build_vpl(build_backbone(ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0, max_positions=48), tok), 3, 16, 16, "mean",
                    head="bilinear", encoder="reward")
    with torch.no_grad():
        vpl.directions.weight.mul_(20)  # z matters, so the pairs differ in what their labels tell
    vpl.save_pretrained(tmp_path / "vpl")
    tok.save_pretrained(tmp_path / "vpl")
    chooser = ActiveChooser(tmp_path / "vpl", pairs)

    def naive(labels):
        torch.manual_seed(0)
        mu, logvar = torch.zeros(1, 3), torch.zeros(1, 3)
        if labels:
            won = torch.stack([chooser.h_a[i] if c == "A" else chooser.h_b[i] for i, c in labels])
            lost = torch.stack([chooser.h_b[i] if c == "A" else chooser.h_a[i] for i, c in labels])
            mu, logvar = vpl.encode(won[None], lost[None], torch.ones(1, len(labels), dtype=torch.bool))
        eps = torch.randn(64, 3, generator=torch.Generator().manual_seed(len(labels)))
        z = mu + (0.5 * logvar).exp() * eps
        done = {i for i, _ in labels}
        gains = {}
        for i in range(len(pairs)):
            if i in done:
                continue
            with torch.no_grad():
                p = torch.sigmoid(vpl.reward(chooser.h_a[i].expand(64, -1), z) - vpl.reward(chooser.h_b[i].expand(64, -1), z))
            gains[i] = float(expected_information_gain(p[:, None])[0])
        return pairs[max(gains, key=gains.get)].pair_id

    db = tmp_path / "labels.sqlite"
    with serving(path, db, token=TOKEN, active=tmp_path / "vpl") as url:
        given = []
        for step in range(4):
            status, body, _ = call(url, "GET", "/api/next?rater=ann")
            assert status == 200
            pid = body["pair"]["pair_id"]
            assert pid == naive(given) and pid not in {pairs[i].pair_id for i, _ in given}
            choice = "A" if step % 2 == 0 else "B"
            assert call(url, "POST", "/api/labels", {"pair_id": pid, "rater": "ann", "choice": choice})[0] == 200
            given.append((next(i for i, p in enumerate(pairs) if p.pair_id == pid), choice))


def test_active_serving_needs_a_vpl_model(tmp_path):
    from apps.labelling.active import ActiveChooser
    from reward_models.backbone import build_reward_model
    from rlhf.errors import UserError
    from rlhf.models import ModelConfig
    from tasks.counterpoint.tokens import build_codec

    tok = build_codec("first_species").tokenizer
    build_reward_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0, max_positions=48), tok).save_pretrained(tmp_path / "bt")
    tok.save_pretrained(tmp_path / "bt")
    with pytest.raises(UserError, match="needs a VPL reward model"):
        ActiveChooser(tmp_path / "bt", music_pairs(2))
