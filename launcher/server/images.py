"""Image URLs of a chat request -> decoded RGB images: data: URLs, file:// paths under the allowed folders,
http(s) downloads with a size and time limit. Every failure is a 400 naming the content part."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import urllib.parse
from pathlib import Path

from launcher.server.errors import bad_request
from launcher.server.settings import MediaSettings

# The formats Pillow decodes that a client sends as photos or screenshots; others (EPS runs Ghostscript,
# and a few decoders are rarely fuzzed) are refused before any decoder runs.
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


async def load_image(url: str, media: MediaSettings, where: str):
    """A decoded PIL image from a content part's URL; `where` names the part in errors."""
    if url.startswith("data:"):
        data = _data_url(url, media.max_bytes, where)
    elif url.startswith("file:"):
        data = _local_file(url, media, where)
    elif url.startswith(("http://", "https://")):
        if media.offline:
            raise bad_request(f"'{where}': the server is offline (LLM_OFFLINE / --offline) and does not fetch "
                              "http(s) image URLs; send the image as a data: URL", where, code="offline")
        data = await _download(url, media, where)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise bad_request(f"'{where}': image URLs must be data:, file:// or http(s) URLs, not {scheme!r}", where)
    return decode_image(data, media.max_pixels, where)


def decode_image(data: bytes, max_pixels: int, where: str):
    """Decode (all of it, now); a non-image, a truncated file or an oversized canvas is a 400."""
    from PIL import Image, UnidentifiedImageError
    try:
        # NOTE: no `with`: the image outlives this call, and its source is bytes in memory (nothing to close)
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise bad_request(f"'{where}': the image is {width}x{height}, more than "
                              f"server.max_image_pixels ({max_pixels}) pixels", where, code="image_too_large")
        image.load()   # decodes now: a truncated file fails here, not in the engine
        # the mode is kept: each model's processor makes RGB its own way (transparency onto white)
        return image
    except UnidentifiedImageError:
        raise bad_request(f"'{where}': not an image (or not one of {', '.join(_FORMATS)})", where,
                          code="invalid_image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise bad_request(f"'{where}': the image cannot be decoded ({e})", where, code="invalid_image") from None


def _data_url(url: str, max_bytes: int, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(f"'{where}': a data URL must be data:image/...;base64,<data>", where)
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise bad_request(f"'{where}': the image is larger than server.max_image_bytes ({max_bytes} bytes)",
                          where, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"'{where}': the data URL's base64 is not valid", where) from None


def _local_file(url: str, media: MediaSettings, where: str) -> bytes:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"'{where}': file URLs must name a local path (file:///...)", where)
    if not media.allowed_dirs:
        raise bad_request(f"'{where}': file:// image URLs are off on this server (set server.allowed_media_dirs)",
                          where, code="forbidden_path")
    # NOTE: resolved before the check, so neither '..' nor a symlink leads out of an allowed folder
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if not any(path.is_relative_to(Path(d).resolve()) for d in media.allowed_dirs):
        raise bad_request(f"'{where}': the path is outside server.allowed_media_dirs", where, code="forbidden_path")
    try:
        size = os.stat(path).st_size
        if not path.is_file():
            raise bad_request(f"'{where}': not a file", where)
        if size > media.max_bytes:
            raise bad_request(f"'{where}': the image is larger than server.max_image_bytes ({media.max_bytes} bytes)",
                              where, code="image_too_large")
        return path.read_bytes()
    except OSError as e:
        raise bad_request(f"'{where}': cannot read the file ({e.strerror})", where) from None


async def _download(url: str, media: MediaSettings, where: str) -> bytes:
    # NOTE: one deadline for the whole download: httpx's timeouts are per read, which a server dripping a
    # byte a second never trips
    try:
        return await asyncio.wait_for(_fetch(url, media, where), media.fetch_timeout_s)
    except asyncio.TimeoutError:
        raise bad_request(f"'{where}': fetching the image took longer than server.media_fetch_timeout_s "
                          f"({media.fetch_timeout_s:g} s)", where, code="image_fetch_failed") from None


async def _fetch(url: str, media: MediaSettings, where: str) -> bytes:
    import httpx
    chunks, total = [], 0
    try:
        async with httpx.AsyncClient(timeout=media.fetch_timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise bad_request(f"'{where}': fetching the image gave HTTP {response.status_code}", where,
                                      code="image_fetch_failed")
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > media.max_bytes:
                        raise bad_request(f"'{where}': the image is larger than server.max_image_bytes "
                                          f"({media.max_bytes} bytes)", where, code="image_too_large")
                    chunks.append(chunk)
    except httpx.HTTPError as e:
        raise bad_request(f"'{where}': cannot fetch the image ({type(e).__name__}: {e})", where,
                          code="image_fetch_failed") from None
    return b"".join(chunks)
