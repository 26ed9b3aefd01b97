"""Weights management: a real HTTP server on loopback, real checkpoint files, a cache
folder moved by LESIONSEG_CACHE."""
from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from LesionSegLib import checkpoint, models
from LesionSegLib import weights as W

SMALL = {"base_width": 4, "depth": 2}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(W.ENV_VAR, str(root))
    return root


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "unet-small.pt"
    net = models.create("unet", **SMALL)
    checkpoint.save(path, net, config=models.config("unet", **SMALL), preset="stroke-dwi",
                    provenance={"note": "test"})
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}
    hits = []

    def log_message(self, *args):   # keep pytest output clean
        pass

    def do_GET(self):
        self.hits.append(self.path)
        if self.path.startswith("/truncated/"):
            body = self.files[self.path[len("/truncated"):]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])   # then the connection closes
            self.wfile.flush()
            self.close_connection = True
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server(small_checkpoint):
    _Handler.files = {"/unet.pt": small_checkpoint.read_bytes(), "/garbage.pt": b"not a checkpoint" * 100}
    _Handler.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(root: Path):
    return [p.name for p in root.rglob("*") if p.name.endswith(".part") or p.name.startswith(".")]


def test_cache_dir_follows_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(W.ENV_VAR, str(tmp_path / "elsewhere"))
    assert W.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(W.ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if os.name == "posix" and not os.uname().sysname == "Darwin":
        assert W.cache_dir() == tmp_path / "xdg" / "lesionseg"
        # Slicer's Python has no platformdirs of its own: the copy inside its pip gives the same folder
        monkeypatch.setitem(__import__("sys").modules, "platformdirs", None)
        assert W.cache_dir() == tmp_path / "xdg" / "lesionseg"


def test_download_verifies_and_installs_once(cache, server):
    url, handler = server
    body = handler.files["/unet.pt"]
    seen = []
    entry = W.download(f"{url}/unet.pt", _sha(body), progress=lambda f, m: seen.append(f))
    assert Path(entry.path).read_bytes() == body
    assert Path(entry.path).is_relative_to(cache)
    assert entry.model == "unet" and entry.preset == "stroke-dwi" and entry.kind == "lesionseg"
    assert entry.sha256 == _sha(body) and entry.size == len(body) and entry.source.endswith("/unet.pt")
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert [e.id for e in W.list_installed("U-Net")] == [entry.id]
    assert W.find("unet", "stroke-dwi").path == entry.path
    assert W.find("unet", "polyp") is None
    assert W.list_installed("msenet") == []
    # same digest again: nothing is requested, nothing duplicated
    n = len(handler.hits)
    again = W.download(f"{url}/unet.pt", _sha(body).upper())
    assert again.id == entry.id and len(handler.hits) == n
    assert len(W.list_installed()) == 1
    # the installed file loads as the network it claims to be
    ck = checkpoint.load(entry.path)
    assert ck.name == "unet" and ck.config["base_width"] == 4


def test_wrong_digest_installs_nothing(cache, server):
    url, handler = server
    with pytest.raises(W.WeightsError, match="does not match its SHA-256"):
        W.download(f"{url}/unet.pt", "0" * 64)
    assert W.list_installed() == []
    assert _leftovers(cache) == []


def test_http_error_truncation_and_bad_digest_argument(cache, server):
    url, handler = server
    with pytest.raises(W.WeightsError, match="HTTP 404"):
        W.download(f"{url}/missing.pt", "a" * 64)
    body = handler.files["/unet.pt"]
    with pytest.raises(W.WeightsError, match="incomplete|interrupted"):
        W.download(f"{url}/truncated/unet.pt", _sha(body))
    n = len(handler.hits)
    with pytest.raises(W.WeightsError, match="SHA-256"):
        W.download(f"{url}/unet.pt", "")
    with pytest.raises(W.WeightsError, match="SHA-256"):
        W.download(f"{url}/unet.pt", "xyz")
    assert len(handler.hits) == n   # refused before any request
    with pytest.raises(W.WeightsError, match="scheme"):
        W.download("ftp://127.0.0.1/unet.pt", _sha(body))
    assert W.list_installed() == [] and _leftovers(cache) == []


def test_unreachable_server_is_a_clear_error(cache):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens there now
    with pytest.raises(W.WeightsError, match="failed"):
        W.download(f"http://127.0.0.1:{port}/x.pt", "b" * 64, timeout=5)


def test_downloaded_file_that_is_not_a_checkpoint_is_rejected(cache, server):
    url, handler = server
    body = handler.files["/garbage.pt"]
    with pytest.raises(W.WeightsError, match="garbage|not a readable"):
        W.download(f"{url}/garbage.pt", _sha(body))
    assert W.list_installed() == [] and _leftovers(cache) == []


def test_cancelled_download_leaves_nothing(cache, server):
    url, handler = server
    body = handler.files["/unet.pt"]
    with pytest.raises(W.WeightsError, match="cancelled"):
        W.download(f"{url}/unet.pt", _sha(body), cancel=lambda: True)
    assert W.list_installed() == [] and _leftovers(cache) == []


def test_import_copies_and_never_touches_the_original(cache, small_checkpoint):
    before = (small_checkpoint.read_bytes(), small_checkpoint.stat().st_mtime_ns)
    entry = W.import_checkpoint(small_checkpoint)
    assert (small_checkpoint.read_bytes(), small_checkpoint.stat().st_mtime_ns) == before
    assert Path(entry.path) != small_checkpoint and Path(entry.path).read_bytes() == before[0]
    assert entry.source == str(small_checkpoint.resolve())
    assert W.import_checkpoint(small_checkpoint).id == entry.id   # no second copy
    assert len(W.list_installed()) == 1


def test_import_of_a_bad_file_names_it(cache, tmp_path):
    bad = tmp_path / "my-weights.pth"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(W.WeightsError, match=r"my-weights\.pth: "):
        W.import_checkpoint(bad)
    with pytest.raises(W.WeightsError, match="no such weight file"):
        W.import_checkpoint(tmp_path / "absent.pt")
    assert W.list_installed() == [] and _leftovers(cache) == []


def test_import_of_weights_that_do_not_fit_names_the_keys(cache, tmp_path):
    import torch
    sd = models.create("unet", **SMALL).state_dict()
    sd.pop("head.bias")
    path = tmp_path / "plain.pth"
    torch.save(sd, path)
    with pytest.raises(W.WeightsError, match=r"plain\.pth.*does not fit: .*missing key"):
        W.import_checkpoint(path, model="unet")
    assert W.list_installed() == [] and _leftovers(cache) == []


def test_same_name_different_content_keeps_both_and_remove_and_clear(cache, small_checkpoint, tmp_path):
    other = tmp_path / "unet-small.pt"
    net = models.create("unet", **SMALL)
    checkpoint.save(other, net, config=models.config("unet", **SMALL), preset="polyp")
    a = W.import_checkpoint(small_checkpoint)
    b = W.import_checkpoint(other)
    assert a.id != b.id and {a.preset, b.preset} == {"stroke-dwi", "polyp"}
    assert W.find("unet", "polyp").id == b.id
    freed = W.remove(a.id)
    assert freed == small_checkpoint.stat().st_size
    assert [e.id for e in W.list_installed()] == [b.id]
    with pytest.raises(W.WeightsError, match="no installed weights"):
        W.remove(a.id)
    assert W.cache_size() > 0
    assert W.clear_cache() > 0
    assert W.list_installed() == [] and not (cache / "weights").exists()
    assert W.clear_cache() == 0


def test_weights_module_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys; import LesionSegLib.weights, LesionSegLib.slicer.logic, LesionSegLib.slicer.bridge; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parents[1]), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
