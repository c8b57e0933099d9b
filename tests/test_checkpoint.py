"""Checkpoint download (against a local HTTP server the test starts) and loading."""

from __future__ import annotations

import hashlib
import http.server
import os
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


def test_512_variant_loads_a_tiny_checkpoint(tmp_path, monkeypatch):
    from dataclasses import replace

    from napari_sam2.model.config import MODELS

    sd = build_model(get_config("sam2.1_hiera_tiny")).state_dict()
    model = load_model("medsam2", _save(tmp_path, sd))
    assert model.image_size == 512
    assert model.sam_prompt_encoder.image_embedding_size == (32, 32)
    # a config registered without a download of its own: its file must be given
    monkeypatch.setitem(MODELS, "my_tiny_384", replace(get_config("sam2.1_hiera_tiny"), name="my_tiny_384", image_size=384))
    with pytest.raises(CheckpointError, match="no official download"):
        load_model("my_tiny_384")


def test_unknown_model_lists_names():
    with pytest.raises(KeyError, match="sam2.1_hiera_large"):
        get_config("sam3")


# ---------------------------------------------------------------- published sums


PUBLISHED = {  # from Meta's release notes: 072824/ = SAM 2.0, 092824/ = SAM 2.1
    "sam2_hiera_tiny": ("072824", "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125"),
    "sam2_hiera_small": ("072824", "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3"),
    "sam2_hiera_base_plus": ("072824", "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071"),
    "sam2_hiera_large": ("072824", "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b"),
    "sam2.1_hiera_tiny": ("092824", "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"),
    "sam2.1_hiera_small": ("092824", "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38"),
    "sam2.1_hiera_base_plus": ("092824", "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5"),
    "sam2.1_hiera_large": ("092824", "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318"),
}


def test_official_checkpoints_pin_the_published_sums():
    from napari_sam2.model import CHECKPOINTS

    assert set(CHECKPOINTS) == set(PUBLISHED) | {"medsam2"}
    # MedSAM2 publishes no sum: its file is checked against its first download's
    assert CHECKPOINTS["medsam2"].url == "https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt"
    assert CHECKPOINTS["medsam2"].sha256 is None
    for name, (folder, digest) in PUBLISHED.items():
        info = CHECKPOINTS[name]
        assert info.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/{folder}/{name}.pt"
        assert info.sha256 == digest, name


@pytest.fixture()
def offline(monkeypatch):
    """Fail the test if anything tries to download."""
    import pooch

    def retrieve(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(pooch, "retrieve", retrieve)


def test_cached_file_not_matching_the_published_sum_is_refused(offline, capsys):
    """A file kept by the old trust-on-first-use scheme is refused even though its own
    record (<file>.sha256) vouches for it; it is not silently replaced either."""
    from napari_sam2.cli import main
    from napari_sam2.model.checkpoint import cache_dir

    cached = cache_dir() / "sam2.1_hiera_tiny.pt"
    cached.parent.mkdir(parents=True, exist_ok=True)
    content = b"an unchecked first download" * 100
    cached.write_bytes(content)
    cached.with_name(cached.name + ".sha256").write_text(hashlib.sha256(content).hexdigest() + "\n")
    with pytest.raises(CheckpointError) as info:
        load_model("sam2.1_hiera_tiny")
    msg = str(info.value)
    assert str(cached) in msg and "napari-sam2 fetch sam2.1_hiera_tiny" in msg and "Delete" in msg
    assert PUBLISHED["sam2.1_hiera_tiny"][1] in msg
    assert cached.read_bytes() == content
    # the command line says the same in one line
    assert main(["fetch", "sam2.1_hiera_tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "napari-sam2 fetch sam2.1_hiera_tiny" in err[0]


def test_verified_file_is_not_hashed_on_every_load(server, tmp_path):
    base, handler = server
    handler.payload = b"0123456789" * 10_000
    digest = hashlib.sha256(handler.payload).hexdigest()
    url, cache = f"{base}/w.pt", tmp_path / "cache"
    path = fetch_checkpoint(url, sha256=digest, folder=cache, progressbar=False)
    handler.payload = b"the server now serves something else"
    # verified at download: later uses neither download nor read it
    assert fetch_checkpoint(url, sha256=digest, folder=cache, progressbar=False) == path
    assert fetch_checkpoint(url, sha256=digest, folder=cache, progressbar=False) == path
    # the proof that it is not read: other bytes, same size and modification time, still accepted
    stat = path.stat()
    path.write_bytes(b"9" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fetch_checkpoint(url, sha256=digest, folder=cache, progressbar=False) == path
    # a new modification time makes it hash the file again, and refuse it
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(CheckpointError, match="not the published file"):
        fetch_checkpoint(url, sha256=digest, folder=cache, progressbar=False)


def test_file_put_in_the_cache_by_hand_is_checked_once(tmp_path, offline):
    """The offline route (copy the file into the cache): hashed on first use, then trusted."""
    content = b"weights copied from another computer" * 100
    digest = hashlib.sha256(content).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / "m.pt"
    path.write_bytes(content[::-1])  # a wrong file copied by hand is refused on first use
    with pytest.raises(CheckpointError, match="not the published file"):
        fetch_checkpoint("https://example.invalid/m.pt", sha256=digest, folder=cache)
    path.write_bytes(content)
    for _ in range(3):
        assert fetch_checkpoint("https://example.invalid/m.pt", sha256=digest, folder=cache) == path
    # once verified it is not read again: other bytes with the same size and time pass
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fetch_checkpoint("https://example.invalid/m.pt", sha256=digest, folder=cache) == path


def test_model_profiles_give_the_defaults(monkeypatch):
    """A model's profile decides the orientations the widget and CLI start with and whether
    the annotator keeps corrections as conditioning slices."""
    from dataclasses import replace

    import numpy as np

    from napari_sam2.controller import Annotator
    from napari_sam2.model.config import MODELS, NANO, ModelProfile
    from napari_sam2.model.ensemble import default_orientations

    assert default_orientations(NANO.name) == 8 and default_orientations("sam2.1_hiera_tiny") == 1
    assert default_orientations("not a model") == 1
    cfg = replace(get_config("sam2.1_hiera_tiny"), name="my_profiled",
                  profile=ModelProfile(orientations=4, corrections_as_conditioning=False))
    monkeypatch.setitem(MODELS, "my_profiled", cfg)
    assert default_orientations("my_profiled") == 4
    # the annotator's sessions follow the profile unless told otherwise
    model = build_model(cfg.with_image_size(64))
    vol = np.random.default_rng(0).normal(500, 50, (4, 40, 40)).astype(np.float32)
    ann = Annotator(model, vol, axis=0, displayed=(1, 2), intensity_range=(0, 1000))
    assert ann.segmenter.session_kwargs["corrections_as_conditioning"] is False
    ann2 = Annotator(model, vol, axis=0, displayed=(1, 2), intensity_range=(0, 1000), corrections_as_conditioning=True)
    assert ann2.segmenter.session_kwargs["corrections_as_conditioning"] is True
