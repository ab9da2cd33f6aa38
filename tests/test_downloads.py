"""Downloads (``bench.io.fetch_url``): checked against a pinned sha256, streamed with a timeout into a
per-process temp file, renamed atomically; the shipped URLs are pinned; tests cannot reach the network."""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import bench.io
from bench.errors import DataError
from bench.io import fetch_url, split_pin
from conftest import NETWORK_BLOCKED, SHARED_DATA, force_offline

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
FIX = "run `bench prefetch` where the network is reachable"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "src" / "weights.bin"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


class SlowHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD in 64 KiB pieces with a pause between them, so concurrent downloads overlap."""

    requests = 0

    def do_GET(self):
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        for start in range(0, len(PAYLOAD), 1 << 16):
            self.wfile.write(PAYLOAD[start : start + (1 << 16)])
            time.sleep(0.01)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An HTTP server on localhost, in a thread (allowed by the conftest network guard)."""
    SlowHandler.requests = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# --------------------------------------------------------------------------- fetch_url


def test_the_pinned_file_is_downloaded_once_and_kept(source, tmp_path):
    dest = tmp_path / "cache" / "weights.bin"
    assert fetch_url(f"file://{source}", dest, FIX, sha256=PAYLOAD_SHA256) == dest
    assert dest.read_bytes() == PAYLOAD and leftovers(dest.parent) == ["weights.bin"]
    source.unlink()  # cached: the second call needs no source
    assert fetch_url(f"file://{source}#sha256={PAYLOAD_SHA256}", dest, FIX) == dest and dest.read_bytes() == PAYLOAD


def test_a_tampered_download_is_refused_in_one_line_and_nothing_is_left(source, tmp_path):
    source.write_bytes(PAYLOAD[:-1] + b"!")
    actual = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "weights.bin"
    with pytest.raises(DataError) as err:
        fetch_url(f"file://{source}", dest, FIX, sha256=PAYLOAD_SHA256)
    message = str(err.value)
    assert "\n" not in message and message.startswith("weights.bin downloaded from file://")
    assert f"expected {PAYLOAD_SHA256}, actual {actual}" in message and message.endswith(FIX)
    assert not dest.exists() and leftovers(dest.parent) == []  # neither the file nor its temp file


def test_a_mismatching_file_already_in_the_cache_is_refused_and_removed(source, tmp_path):
    dest = tmp_path / "cache" / "weights.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"saved by hand, wrong")
    with pytest.raises(DataError, match=rf"^{re.escape(str(dest))} does not match the pinned sha256 of file://\S+ \(expected {PAYLOAD_SHA256}, actual [0-9a-f]{{64}}\); removed it: "):
        fetch_url(f"file://{source}", dest, FIX, sha256=PAYLOAD_SHA256)
    assert not dest.exists()
    assert fetch_url(f"file://{source}", dest, FIX, sha256=PAYLOAD_SHA256).read_bytes() == PAYLOAD


def test_an_unpinned_url_needs_the_opt_in_which_logs_its_sha256(source, tmp_path, monkeypatch, caplog):
    dest = tmp_path / "cache" / "weights.bin"
    monkeypatch.delenv("BENCH_ALLOW_UNPINNED", raising=False)
    with pytest.raises(DataError) as err:
        fetch_url(f"file://{source}", dest, FIX)
    assert str(err.value) == f"file://{source} has no pinned sha256, so bench does not download it: set BENCH_ALLOW_UNPINNED=1 to download it once and log its sha256 to pin, or {FIX}"
    assert not dest.exists()
    monkeypatch.setenv("BENCH_ALLOW_UNPINNED", "1")
    with caplog.at_level(logging.WARNING, logger="bench.io"):
        assert fetch_url(f"file://{source}", dest, FIX).read_bytes() == PAYLOAD
    assert f"pin it: file://{source}#sha256={PAYLOAD_SHA256}" in caplog.text


def test_a_malformed_pin_is_one_line():
    assert split_pin(f"https://x.org/a.txt#sha256={PAYLOAD_SHA256.upper()}") == ("https://x.org/a.txt", PAYLOAD_SHA256)
    assert split_pin("https://x.org/a.txt") == ("https://x.org/a.txt", None)
    for bad in ("https://x.org/a.txt#sha256=abc", "https://x.org/a.txt#md5=" + "0" * 32, f"https://x.org/a.txt#sha256={'g' * 64}"):
        with pytest.raises(DataError, match=r"^malformed pin in https://x\.org/a\.txt#\S+: a URL may end in #sha256= and the 64 hex digits"):
            split_pin(bad)


def test_a_localhost_download_streams_with_a_progress_bar(server, tmp_path, monkeypatch):
    seen = []
    real = bench.io.progress

    def spy(*args, **kwargs):
        seen.append((kwargs.get("enabled"), kwargs.get("total"), kwargs.get("unit"), kwargs.get("desc")))
        return real(*args, **kwargs)  # quiet here: stderr is no terminal under pytest

    monkeypatch.setattr(bench.io, "progress", spy)
    dest = tmp_path / "w.bin"
    fetch_url(f"{server}/w.bin#sha256={PAYLOAD_SHA256}", dest, FIX)
    assert dest.read_bytes() == PAYLOAD and SlowHandler.requests == 1
    assert seen == [(True, len(PAYLOAD), "B", "w.bin")]  # a byte bar sized by Content-Length


def test_concurrent_downloads_of_one_url_both_end_with_the_right_file(server, tmp_path):
    dest = tmp_path / "cache" / "w.bin"
    results, errors = [], []

    def worker():
        try:
            results.append(fetch_url(f"{server}/w.bin", dest, FIX, sha256=PAYLOAD_SHA256))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [dest, dest] and SlowHandler.requests == 2  # both downloaded, at once
    assert dest.read_bytes() == PAYLOAD and leftovers(dest.parent) == ["w.bin"]


def test_a_server_that_never_answers_fails_within_the_timeout_in_one_line(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens (the kernel accepts) but never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/w.bin"
        start = time.monotonic()
        with pytest.raises(DataError) as err:
            fetch_url(url, tmp_path / "w.bin", FIX, sha256=PAYLOAD_SHA256, timeout=0.5)
        elapsed = time.monotonic() - start
    assert 0.4 < elapsed < 5 and str(err.value) == f"cannot download {url} (no answer within 0.5 s): {FIX}"
    assert leftovers(tmp_path) == []


def test_a_prompt_url_on_the_command_line_is_pinned_by_its_suffix(tmp_path):
    from bench.plan.planner import prompt_rows
    from bench.suite import prompt_url_path, read_prompt_source

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bowl\n")
    url = f"file://{prompts}"
    with pytest.raises(DataError) as err:
        read_prompt_source(url, tmp_path, "method=sft", "method.train_prompts", tmp_path / "cache")
    assert str(err.value) == (f"{url} has no pinned sha256, so bench does not download it: set BENCH_ALLOW_UNPINNED=1 to download it once and log its sha256 "
                              f"to pin, or run `bench prefetch method=sft` where the network is reachable, or download {url} and set method.train_prompts=PATH")
    pinned = f"{url}#sha256={hashlib.sha256(prompts.read_bytes()).hexdigest()}"
    rows, where = read_prompt_source(pinned, tmp_path, "method=sft", "method.train_prompts", tmp_path / "cache")
    assert [r["prompt"] for r in rows] == ["a red fox", "a blue bowl"] and where == pinned
    cached = prompt_url_path(pinned, tmp_path / "cache")
    assert cached == prompt_url_path(url, tmp_path / "cache") and cached.name.endswith("-prompts.txt") and cached.is_file()
    assert prompt_rows(pinned, tmp_path, tmp_path / "cache") == 2  # `bench plan` counts the cached copy, downloading nothing


# --------------------------------------------------------------------------- the network is off in tests


def test_the_hub_variables_are_forced_on_even_if_the_shell_said_0(monkeypatch):
    assert [os.environ[v] for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")] == ["1", "1", "1"]
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")  # what `HF_HUB_OFFLINE=0 pytest` exports
    force_offline()  # what conftest runs before any test module is imported
    assert [os.environ[v] for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")] == ["1", "1", "1"]
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_a_network_connection_fails_at_once_with_the_guard_message():
    for attempt in (lambda: socket.create_connection(("example.org", 443), timeout=30), lambda: socket.getaddrinfo("example.org", 443),
                    lambda: socket.socket().connect(("93.184.215.14", 80)), lambda: urllib.request.urlopen("http://example.org/", timeout=30)):
        start = time.monotonic()
        with pytest.raises(OSError, match=re.escape(NETWORK_BLOCKED)):
            attempt()
        assert time.monotonic() - start < 1


def test_fetch_url_refuses_a_remote_url_at_once_offline_and_never_probes_the_hub(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match=r"^w\.bin is not in \S+ and downloads are off or the network is unreachable: run `bench prefetch`"):
        fetch_url(f"https://example.org/w.bin#sha256={PAYLOAD_SHA256}", tmp_path / "w.bin", FIX)
    assert time.monotonic() - start < 1
    assert bench.io.hub_offline() is True and bench.io._HUB_REACHABLE is None  # the variable answered: the TCP probe never ran


# --------------------------------------------------------------------------- the shipped URLs


def shipped_urls() -> list[tuple[str, str]]:
    out = []
    for path in sorted(REPO.glob("bench/**/*.yaml")):
        for line in path.read_text().splitlines():
            code = line.split(" #", 1)[0]
            out += [(path.relative_to(REPO).as_posix(), url) for url in re.findall(r"https?://\S+", code)]
    return out


def test_every_url_the_configs_download_is_pinned_and_matches_the_copies_we_hold():
    urls = shipped_urls()
    assert len(urls) == 15 and all(split_pin(url)[1] for _, url in urls), [u for u in urls if not split_pin(u[1])[1]]
    copies = {  # unmodified copies in shared/data (their SOURCE.md records the same commits)
        "coco_30k.csv": SHARED_DATA / "coco" / "rohitgandikota-erasing" / "coco_30k.csv",
        "4k_training_prompts.json": SHARED_DATA / "pickapic" / "4k_training_prompts.json",
        **{p.name: p for p in (SHARED_DATA / "t2i-compbench").glob("*_val.txt")},
    }
    checked = 0
    for _, url in urls:
        base, pin = split_pin(url)
        copy = copies.get(Path(base).name)
        if copy is not None and copy.is_file():
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == pin, url
            checked += 1
    assert checked in (0, 13)  # every prompt file (not the 6 GB COCO archive), when shared/data is there


def test_the_weight_urls_are_pinned_or_say_why_not():
    from bench.metrics import clip, fid, vqa

    assert clip.AESTHETIC_SHA256 == "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
    assert "/raw/6934dd81792f086e613a121dbce43082cb8be85e/" in clip.AESTHETIC_URL
    assert fid.INCEPTION_SHA256 == "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
    assert vqa.BLIP_VQA_SHA256 is None  # no published hash: downloading it takes BENCH_ALLOW_UNPINNED=1


def test_the_blip_weights_without_a_pin_are_one_line_naming_the_opt_in(tmp_path, monkeypatch):
    from bench.errors import WeightsMissingError
    from bench.metrics.vqa import BlipVqa

    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.delenv("BENCH_ALLOW_UNPINNED", raising=False)
    with pytest.raises(WeightsMissingError) as err:
        BlipVqa().url_weights(BlipVqa.checkpoint_url, BlipVqa.checkpoint_sha256)
    message = str(err.value)
    assert "\n" not in message and message.startswith("metric blip-vqa: https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_vqa_capfilt_large.pth has no pinned sha256")
    assert "BENCH_ALLOW_UNPINNED=1" in message and "`bench prefetch metrics=blip-vqa`" in message


# --------------------------------------------------------------------------- DreamBench, file by file


def dreambench_tree(root: Path) -> dict[str, bytes]:
    files = {"LICENSE.md": b"CC BY 4.0\n", "dataset/prompts_and_classes.txt": b"table\n", "dataset/dog/00.jpg": b"\xff\xd8 a dog", "dataset/rc car/00.jpg": b"\xff\xd8 a car"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_dreambench_is_fetched_file_by_file_each_checked(tmp_path):
    from bench.suite import fetch_dreambench, read_sha256sums

    files = dreambench_tree(tmp_path / "upstream")
    manifest = tmp_path / "dreambench.sha256"
    manifest.write_text("".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items()))
    root = fetch_dreambench(tmp_path / "cache", base_url=f"file://{tmp_path / 'upstream'}", manifest=manifest)
    assert {n: (root / n).read_bytes() for n in files} == files
    (tmp_path / "upstream" / "dataset" / "dog" / "00.jpg").write_bytes(b"tampered")
    (root / "dataset" / "dog" / "00.jpg").unlink()
    with pytest.raises(DataError, match=r"^00\.jpg downloaded from file://\S+/dataset/dog/00\.jpg does not match its pinned sha256 .*clone https://github\.com/google/dreambooth \(commit 4f887af\)"):
        fetch_dreambench(tmp_path / "cache", base_url=f"file://{tmp_path / 'upstream'}", manifest=manifest)
    assert not (root / "dataset" / "dog" / "00.jpg").exists()
    shipped = read_sha256sums(REPO / "bench" / "data" / "dreambench-4f887af7970a.sha256")
    assert len(shipped) == 161 and sum(n.endswith(".jpg") for n in shipped) == 158
    assert shipped["dataset/prompts_and_classes.txt"] == "f632a5bdb41c3909ce22a0aefcea14432c0897e8db14ab845e68850af5ada486"  # = shared/data/dreambench/SOURCE.md
