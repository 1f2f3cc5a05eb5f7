"""The files a character card travels in: JSON, PNG (text chunks) and CharX (a V3 zip).

Reading is bounded: a file over `MAX_CARD_BYTES`, a PNG whose compressed text chunk expands past Pillow's
`MAX_TEXT_CHUNK` (a decompression bomb), an image of more than `MAX_IMAGE_PIXELS`, or a CharX zip whose
members would expand past `MAX_CHARX_BYTES` is refused with one error naming the file. PNG chunks are
read by Pillow; a PNG is written by splicing chunks into the stored image, never by re-encoding it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import warnings
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from bot.errors import PersonaError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
MAX_CARD_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_CHARX_BYTES = 64 * 1024 * 1024
MAX_CHARX_MEMBERS = 2000
CHARX_CARD = "card.json"
CARD_CHUNKS = ("ccv3", "chara")  # ccv3 wins when both are there


def read_limited(path: Any, source: str) -> bytes:
    """The file's bytes; a `PersonaError` when it is missing, unreadable or over `MAX_CARD_BYTES`."""
    try:
        size = path.stat().st_size
        if size > MAX_CARD_BYTES:
            raise PersonaError(
                f"{source}: {size} bytes is too large for a character card (limit {MAX_CARD_BYTES})"
            )
        return bytes(path.read_bytes())
    except FileNotFoundError:
        raise PersonaError(f"{source}: not found") from None
    except OSError as exc:
        raise PersonaError(f"{source}: cannot read: {exc.strerror}") from None


# -- PNG ------------------------------------------------------------------------------------------------


def png_text_chunks(raw: bytes, source: str) -> dict[str, str]:
    """The PNG's text chunks (tEXt, zTXt, iTXt) by keyword, read by Pillow within its text limits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise PersonaError(
                        f"{source}: image of {width}x{height} pixels is too large for a card avatar "
                        f"(limit {MAX_IMAGE_PIXELS} pixels)"
                    )
                # Chunks after the image data (where card tools put them) are read when it loads.
                # `text` is PNG-only (PngImageFile): Pillow's stubs do not have it on Image.
                return {str(k): str(v) for k, v in image.text.items()}  # type: ignore[attr-defined]
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PersonaError(f"{source}: refused as a decompression bomb: {exc}") from None
    except ValueError as exc:  # Pillow's text limits: MAX_TEXT_CHUNK per chunk, MAX_TEXT_MEMORY in all
        raise PersonaError(f"{source}: PNG text chunk refused: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, zlib.error) as exc:
        raise PersonaError(f"{source}: unreadable PNG: {exc}") from None


def decode_chunk(text: str, key: str, source: str) -> Any:
    """A card chunk's JSON: base64 of UTF-8 JSON."""
    try:
        raw = base64.b64decode(text.strip(), validate=False)
        return json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PersonaError(f"{source}: PNG chunk {key!r} is not base64-encoded JSON ({exc})") from None


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def embed_in_png(image: bytes, cards: dict[str, dict[str, Any]]) -> bytes:
    """`image` with its card chunks replaced by one tEXt chunk per `cards` key (base64 JSON), no re-encode."""
    out = [PNG_SIGNATURE]
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(image):
        (length,) = struct.unpack(">I", image[pos : pos + 4])
        kind = image[pos + 4 : pos + 8]
        chunk = image[pos : pos + 12 + length]
        pos += 12 + length
        if kind in (b"tEXt", b"iTXt", b"zTXt") and chunk[8:].split(b"\0", 1)[0] in (b"chara", b"ccv3"):
            continue
        if kind == b"IEND":
            for key, card in cards.items():
                payload = base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8"))
                out.append(_png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + payload))
        out.append(chunk)
        if kind == b"IEND":
            break
    return b"".join(out)


def blank_avatar() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (400, 600), (40, 44, 52)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- CharX ----------------------------------------------------------------------------------------------


def _member_path(name: str, source: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or not path.parts:
        raise PersonaError(f"{source}: unsafe path in the zip: {name!r}")
    return str(path)


def read_charx(raw: bytes, source: str) -> tuple[Any, dict[str, bytes]]:
    """(card JSON, other members by path) of a CharX zip, within `MAX_CHARX_*`."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile as exc:
        raise PersonaError(f"{source}: not a CharX file: {exc}") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > MAX_CHARX_MEMBERS:
            raise PersonaError(f"{source}: {len(infos)} files in the zip (limit {MAX_CHARX_MEMBERS})")
        total = sum(i.file_size for i in infos)
        if total > MAX_CHARX_BYTES:
            raise PersonaError(
                f"{source}: the zip expands to {total} bytes (limit {MAX_CHARX_BYTES}); refused"
            )
        members: dict[str, bytes] = {}
        try:
            for info in infos:
                name = _member_path(info.filename, source)
                with archive.open(info) as fh:  # read one byte past the declared size: a lying header
                    data = fh.read(info.file_size + 1)
                if len(data) > info.file_size:
                    raise PersonaError(f"{source}: {name}: larger than the zip says; refused")
                members[name] = data
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as exc:
            raise PersonaError(f"{source}: unreadable zip member: {exc}") from None
    card = members.pop(CHARX_CARD, None)
    if card is None:
        raise PersonaError(f"{source}: CharX zip has no {CHARX_CARD}")
    return load_json(card, f"{source} ({CHARX_CARD}):"), members


def load_json(raw: bytes, prefix: str) -> Any:
    """UTF-8 JSON (a BOM allowed); a `PersonaError` starting with `prefix` and saying where it breaks."""
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise PersonaError(f"{prefix} not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise PersonaError(
            f"{prefix} invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def charx_bytes(card: dict[str, Any], assets: dict[str, bytes]) -> bytes:
    """A CharX zip: `card.json` and the assets under their paths."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CHARX_CARD, json.dumps(card, ensure_ascii=False, indent=2) + "\n")
        for name in sorted(assets):
            archive.writestr(name, assets[name])
    return buffer.getvalue()
