"""Image URLs -> decoded images (launcher/server/images.py): each way in, and each way it is refused."""
import asyncio
import base64
import http.server
import io
import threading
import time

import pytest
from PIL import Image

from launcher.server.errors import APIError
from launcher.server.images import decode_image, load_image
from launcher.server.settings import MediaSettings


def png(width: int = 20, height: int = 12) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def load(url: str, **media) -> Image.Image:
    return asyncio.run(load_image(url, MediaSettings(**media), "messages[0].content[1]"))


def refused(url: str, code: str | None = None, **media) -> APIError:
    with pytest.raises(APIError) as info:
        load(url, **media)
    error = info.value
    assert error.status == 400 and error.param == "messages[0].content[1]", error
    if code:
        assert error.code == code, error
    return error


def test_a_data_url_decodes():
    image = load(data_url(png(20, 12)))
    assert image.size == (20, 12) and image.mode == "RGB" and image.getpixel((3, 3)) == (200, 30, 90)
    rgba = io.BytesIO()
    Image.new("RGBA", (5, 5), (1, 2, 3, 4)).save(rgba, format="PNG")
    assert load(data_url(rgba.getvalue())).mode == "RGBA"   # the model's processor composites it


def test_what_is_not_an_image_is_a_400():
    refused(data_url(b"%PDF-1.4 not an image"), "invalid_image")
    refused(data_url(png()[:60]), "invalid_image")            # truncated PNG
    refused("data:image/png;base64,@@@@")
    refused("data:image/png,rawbytes")
    refused("ftp://example.com/cat.png")
    refused(data_url(png(300, 300)), "image_too_large", max_pixels=10_000)
    refused(data_url(png(200, 200) + b"\0" * 5000), "image_too_large", max_bytes=4096)


def test_file_urls_only_under_the_allowed_folders(tmp_path):
    allowed, outside = tmp_path / "media", tmp_path / "secret"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "cat.png").write_bytes(png(7, 9))
    (outside / "key.png").write_bytes(png(3, 3))
    (allowed / "link.png").symlink_to(outside / "key.png")
    dirs = (str(allowed),)
    assert load(f"file://{allowed}/cat.png", allowed_dirs=dirs).size == (7, 9)
    refused(f"file://{allowed}/cat.png", "forbidden_path")                      # none allowed by default
    refused(f"file://{outside}/key.png", "forbidden_path", allowed_dirs=dirs)
    refused(f"file://{allowed}/../secret/key.png", "forbidden_path", allowed_dirs=dirs)
    refused(f"file://{allowed}/link.png", "forbidden_path", allowed_dirs=dirs)  # a symlink out is still out
    refused(f"file://{allowed}/missing.png", allowed_dirs=dirs)
    refused(f"file://{allowed}/cat.png", "image_too_large", allowed_dirs=dirs, max_bytes=16)


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow.png":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(50):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass   # the client gave up, as it should
            return
        body = {"/cat.png": png(11, 5), "/big.png": png(64, 64) + b"\0" * 100_000}.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_urls_are_fetched_with_limits(image_host):
    assert load(f"{image_host}/cat.png").size == (11, 5)
    refused(f"{image_host}/missing.png", "image_fetch_failed")
    refused(f"{image_host}/big.png", "image_too_large", max_bytes=50_000)
    started = time.monotonic()
    refused(f"{image_host}/slow.png", "image_fetch_failed", fetch_timeout_s=0.5)   # a byte every 0.1 s
    assert time.monotonic() - started < 3
    refused("http://127.0.0.1:9/none.png", "image_fetch_failed")
    error = refused(f"{image_host}/cat.png", "offline", offline=True)
    assert "offline" in error.message


def test_decode_image_names_the_part():
    with pytest.raises(APIError) as info:
        decode_image(b"GIF89a", 100, "input")
    assert info.value.param == "input"
