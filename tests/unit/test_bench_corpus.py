"""What the bench's load sends: the built-in mix, the user's own images, and each connection's turn."""

from __future__ import annotations

import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from servekit.bench import build_parser, corpus, plan_from_args
from servekit.bench.loadgen import Target, run_load
from servekit.bench.report import full_report
from servekit.errors import ConfigError


@pytest.fixture(scope="module")
def mix() -> list[corpus.BenchImage]:
    return corpus.mixed()


def _encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, fmt)
    return buf.getvalue()


def test_the_mix_spans_thumbnails_to_phone_photos_in_every_format(mix):
    info = corpus.describe(mix, "mixed")
    assert info["count"] == 28 and info["formats"] == {"jpeg": 24, "png": 2, "webp": 2}
    assert info["megapixels_min"] == 0.077 and info["megapixels_max"] == pytest.approx(12.19, abs=0.01)
    assert info["bytes_max"] < 8 * 2**20  # under the handler's max_image_bytes: every one is servable
    for image in mix:
        with Image.open(io.BytesIO(image.body)) as im:
            assert im.mode == "RGB" and im.size == (image.width, image.height)  # stock's handler takes RGB only
            assert im.format.lower() == image.content_type.removeprefix("image/")
            pixels = np.asarray(im)
        assert pixels.std() > 20  # a textured scene, not a flat fill that decodes in no time
    progressive = [i for i in mix if Image.open(io.BytesIO(i.body)).info.get("progressive")]
    assert len(progressive) == 3
    assert "28 image(s) (mixed): jpeg 24, png 2, webp 2" in corpus.summary_line(info)


def test_the_mix_is_the_same_bytes_every_run():
    first = hashlib.sha256(corpus._render(3, 700, 500).tobytes()).hexdigest()
    assert hashlib.sha256(corpus._render(3, 700, 500).tobytes()).hexdigest() == first


def test_own_images_come_from_files_and_folders(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "b.png").write_bytes(_encoded("PNG"))
    (folder / "a.JPG").write_bytes(_encoded("JPEG", (64, 48)))
    (folder / "notes.txt").write_text("not an image")  # skipped: a folder's images are its image files
    (tmp_path / "c.webp").write_bytes(_encoded("WEBP", (10, 20)))
    images = corpus.load([str(folder), str(tmp_path / "c.webp")], 170_000)
    assert [(i.name.rsplit("/", 1)[-1], i.content_type, i.width, i.height) for i in images] == [
        ("a.JPG", "image/jpeg", 64, 48),
        ("b.png", "image/png", 40, 30),
        ("c.webp", "image/webp", 10, 20),
    ]
    (default,) = corpus.load([], 60_000)
    assert default.content_type == "image/jpeg" and (default.width, default.height) == (500, 375)


def test_what_cannot_be_sent_is_refused_before_any_server_starts(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.jpg").write_bytes(b"GIF89a" + bytes(50))
    (tmp_path / "cut.png").write_bytes(_encoded("PNG")[:12])
    with pytest.raises(ConfigError, match="fake.jpg is not a JPEG, PNG or WebP image"):
        corpus.load([str(tmp_path / "fake.jpg")], 1)
    with pytest.raises(ConfigError, match="cut.png: "):
        corpus.load([str(tmp_path / "cut.png")], 1)
    with pytest.raises(ConfigError, match="no .jpg, .jpeg, .png or .webp file"):
        corpus.load([str(tmp_path / "empty")], 1)
    with pytest.raises(ConfigError, match="neither a file nor a folder"):
        corpus.load([str(tmp_path / "missing")], 1)
    with pytest.raises(ConfigError, match="either 'mixed' or paths"):
        corpus.load(["mixed", str(tmp_path / "fake.jpg")], 1)


def test_images_flag_reaches_the_plan_and_the_report():
    plan = plan_from_args(build_parser().parse_args(["--images", "mixed", "--concurrency", "4"]), [])
    assert list(plan.images) == ["mixed"] and list(plan.concurrency) == [4]
    assert list(plan_from_args(build_parser().parse_args([]), []).images) == []
    info = {
        "source": "mixed",
        "count": 2,
        "formats": {"png": 1, "jpeg": 1},
        "bytes_mean": 150_000,
        "bytes_max": 2_340_000,
        "megapixels_min": 0.077,
        "megapixels_median": 0.5,
        "megapixels_max": 12.193,
    }
    text = full_report({"meta": {"images": info}, "runs": []})
    assert text.startswith("Request bodies: 2 image(s) (mixed): jpeg 1, png 1; 0.077-12.193 MP (median 0.5)")
    assert "150 kB mean, 2.34 MB max" in text
    merged = {"meta": [{"images": info}, {"images": info}, {}], "runs": []}
    assert full_report(merged).count("Request bodies") == 1  # named once for the files that share them
    assert "Request bodies" not in full_report({"meta": {"image": {"bytes": 1}}, "runs": []})  # older files


class _Recorder(BaseHTTPRequestHandler):
    """Answers every POST with a valid top-1 answer and records which body came on which connection."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[int, bytes, str]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.seen.append((self.client_address[1], body, self.headers["Content-Type"]))
        answer = b'{"predictions": [{"label": "x"}]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


def test_each_connection_sends_every_body_in_turn_from_its_own_start():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bodies = ((b"one", "image/jpeg"), (b"two", "image/png"), (b"three", "image/webp"))
    try:
        target = Target(f"http://127.0.0.1:{server.server_address[1]}/p", bodies, {"X-Key": "k"}, topk=1)
        result = run_load(target, concurrency=3, duration=0.5, warmup=0.0, processes=2)
    finally:
        server.shutdown()
    assert result.errors == 0 and result.completed > 30
    by_connection: dict[int, list[bytes]] = {}
    for port, body, ctype in _Recorder.seen:
        assert ctype == dict(bodies)[body]  # each body travels with its own Content-Type
        by_connection.setdefault(port, []).append(body)
    assert len(by_connection) == 3
    order = [b for b, _ in bodies]
    for sent in by_connection.values():
        start = order.index(sent[0])
        assert sent == [order[(start + k) % 3] for k in range(len(sent))]  # in turn, none skipped
    assert sorted(order.index(sent[0]) for sent in by_connection.values()) == [0, 1, 2]  # three different starts
