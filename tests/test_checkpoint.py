"""Checkpoint download (against a local HTTP server the test starts) and loading."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from napari_sam2.model import CheckpointError, build_model, get_config, load_model
from napari_sam2.model.checkpoint import (
    describe_state_dict,
    fetch_checkpoint,
    read_state_dict,
)


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    truncate = False

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        body = self.payload[: len(self.payload) // 2] if self.truncate else self.payload
        self.wfile.write(body)
        self.wfile.flush()
        if self.truncate:  # drop the connection mid-transfer
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    """Serve one file from 127.0.0.1 on a free port; yields (base_url, handler_class)."""
    handler = type("H", (_Handler,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def _payload(tmp_path: Path) -> bytes:
    model = build_model(get_config("sam2.1_hiera_tiny").with_image_size(256))
    f = tmp_path / "made.pt"
    torch.save({"model": model.state_dict()}, f)
    return f.read_bytes()


def test_download_success_with_checksum(server, tmp_path):
    base, handler = server
    handler.payload = _payload(tmp_path)
    digest = hashlib.sha256(handler.payload).hexdigest()
    cache = tmp_path / "cache"
    path = fetch_checkpoint(f"{base}/sam2.1_hiera_tiny.pt", sha256=digest, folder=cache, progressbar=False)
    assert path == cache / "sam2.1_hiera_tiny.pt"
    assert path.read_bytes() == handler.payload
    # the downloaded file loads into the model it was made from
    sd = read_state_dict(path)
    assert describe_state_dict(sd) == "a SAM 2.1 tiny checkpoint"
    model = load_model("sam2.1_hiera_tiny", path, image_size=256)
    assert torch.equal(model.no_mem_embed, sd["no_mem_embed"])
    # a second call uses the cache: the server may be gone
    handler.payload = b"something else"
    assert fetch_checkpoint(f"{base}/sam2.1_hiera_tiny.pt", sha256=digest, folder=cache, progressbar=False) == path


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    base, handler = server
    handler.payload = b"not the file you wanted" * 1000
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="SHA-256"):
        fetch_checkpoint(f"{base}/x.pt", sha256="0" * 64, folder=cache, progressbar=False)
    assert not any(cache.glob("*")) if cache.exists() else True


def test_interrupted_download_leaves_nothing(server, tmp_path):
    base, handler = server
    handler.payload = b"0123456789" * 100_000
    handler.truncate = True
    cache = tmp_path / "cache"
    digest = hashlib.sha256(handler.payload).hexdigest()
    with pytest.raises(CheckpointError, match="could not download"):
        fetch_checkpoint(f"{base}/big.pt", sha256=digest, folder=cache, progressbar=False)
    assert not (cache / "big.pt").exists()
    assert not any(cache.glob("*")) if cache.exists() else True


def test_no_server_names_url_and_target(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/sam2.1_hiera_tiny.pt"
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError) as info:
        fetch_checkpoint(url, sha256="0" * 64, folder=cache, progressbar=False, timeout=5)
    msg = str(info.value)
    assert url in msg and str(cache / "sam2.1_hiera_tiny.pt") in msg


def test_unknown_hash_records_sum_and_detects_change(server, tmp_path):
    base, handler = server
    handler.payload = b"abc" * 1000
    cache = tmp_path / "cache"
    path = fetch_checkpoint(f"{base}/f.pt", folder=cache, progressbar=False)
    side = path.with_name("f.pt.sha256")
    assert side.read_text().strip() == hashlib.sha256(handler.payload).hexdigest()
    path.write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="changed since it was downloaded"):
        fetch_checkpoint(f"{base}/f.pt", folder=cache, progressbar=False)


# ---------------------------------------------------------------- wrong files


def _save(tmp_path, obj, name="c.pt") -> Path:
    f = tmp_path / name
    torch.save(obj, f)
    return f


@pytest.mark.parametrize(
    "made_from,asked,expect",
    [
        ("sam2_hiera_tiny", "sam2.1_hiera_tiny", "SAM 2.0 tiny"),
        ("sam2.1_hiera_tiny", "sam2_hiera_tiny", "SAM 2.1 tiny"),
        ("sam2.1_hiera_small", "sam2.1_hiera_tiny", "SAM 2.1 small"),
    ],
)
def test_wrong_variant_is_named(tmp_path, made_from, asked, expect):
    sd = build_model(get_config(made_from).with_image_size(256)).state_dict()
    f = _save(tmp_path, {"model": sd})
    with pytest.raises(CheckpointError) as info:
        load_model(asked, f, image_size=256)
    assert f"looks like a {expect} checkpoint" in str(info.value)
    assert asked in str(info.value)


def test_sam1_checkpoint_is_recognised(tmp_path):
    sd = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
        "image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(27, 64),
        "mask_decoder.iou_token.weight": torch.zeros(1, 256),
    }
    with pytest.raises(CheckpointError, match="SAM 1"):
        load_model("sam2.1_hiera_tiny", _save(tmp_path, sd), image_size=256)


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", b"PK\x03\x04broken zip"])
def test_not_a_checkpoint(tmp_path, content):
    f = tmp_path / "bad.pt"
    f.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model("sam2.1_hiera_tiny", f, image_size=256)


def test_truncated_checkpoint(tmp_path):
    sd = build_model(get_config("sam2.1_hiera_tiny").with_image_size(256)).state_dict()
    f = _save(tmp_path, {"model": sd})
    f.write_bytes(f.read_bytes()[: 100_000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model("sam2.1_hiera_tiny", f, image_size=256)


class NotAllowedInCheckpoints:
    pass


def test_pickled_code_is_refused(tmp_path):
    f = _save(tmp_path, {"model": {"a": torch.zeros(1)}, "x": NotAllowedInCheckpoints()})
    with pytest.raises(CheckpointError):
        read_state_dict(f)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("sam2.1_hiera_tiny", tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="folder"):
        load_model("sam2.1_hiera_tiny", tmp_path)


def test_512_variant_loads_a_tiny_checkpoint(tmp_path):
    sd = build_model(get_config("sam2.1_hiera_tiny")).state_dict()
    model = load_model("sam2.1_hiera_tiny_512", _save(tmp_path, sd))
    assert model.image_size == 512
    assert model.sam_prompt_encoder.image_embedding_size == (32, 32)
    with pytest.raises(CheckpointError, match="no official download"):
        load_model("sam2.1_hiera_tiny_512")


def test_unknown_model_lists_names():
    with pytest.raises(KeyError, match="sam2.1_hiera_large"):
        get_config("sam3")
