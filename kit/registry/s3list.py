"""Listing a registry's prefix with ``ListObjectsV2`` and ``encoding-type=url``, signed by
:class:`kit.registry.s3parts.S3Rest`: what :class:`kit.registry.s3.S3Storage` lists with when it has a static
key.

Why not obstore's list: a store answers a key as it is stored, and one with a control character (another
client can write one; obstore refuses to) makes obstore's whole listing fail, so a bucket writer without a
signing key could stop every ``kit models``, history and version claim. Here keys come URL-encoded, are
decoded, and a key that is not a plain printable path under the registry's prefix is skipped (and logged
once per listing), never returned: the rest of the registry is listed as if it were absent.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from kit.registry.s3parts import S3RequestError, xml_text

log = logging.getLogger(__name__)

_PAGE_KEYS = 1000  # S3's page size (the most it gives)
_MAX_PAGES = 10_000  # 10 million keys: a store that never stops answering "truncated" is refused past it


@dataclass(frozen=True)
class Listed:
    keys: dict[str, int]  # key relative to the registry's root -> size in bytes
    folders: list[str]  # the names right under the listed prefix (with a delimiter)


class ListingError(Exception):
    """A listing the store refused or answered with something that is not a listing."""


def list_prefix(rest: Any, prefix: str, delimiter: bool = False) -> Listed:
    """Every object under ``prefix`` (relative to the registry's root; "" for all), following continuation
    tokens; with ``delimiter``, only the folder names right under it."""
    root = f"{rest.prefix}/" if rest.prefix else ""
    start = root + (prefix.strip("/") + "/" if prefix.strip("/") else "")
    query = {"list-type": "2", "encoding-type": "url", "prefix": start, "max-keys": str(_PAGE_KEYS),
             **({"delimiter": "/"} if delimiter else {})}
    keys: dict[str, int] = {}
    folders: list[str] = []
    skipped = 0
    for _ in range(_MAX_PAGES):
        try:
            page = rest.call("GET", None, query)
        except S3RequestError as exc:
            raise ListingError(str(exc)) from exc
        for key, size in _contents(page):
            rel = _plain(key, root)
            if rel is None:
                skipped += 1
            else:
                keys[rel] = size
        for p in _all(page, "Prefix", within="CommonPrefixes"):
            name = _plain(p.rstrip("/"), start)
            if name is None or "/" in name:
                skipped += 1
            else:
                folders.append(name)
        token = xml_text(page, "NextContinuationToken")
        if xml_text(page, "IsTruncated") != "true" or not token:
            break
        query = {**query, "continuation-token": token}
    else:
        raise ListingError(f"the listing of {start or '/'} was still truncated after {_MAX_PAGES} pages")
    if skipped:
        log.warning("%s: skipped %d key(s) under %s that are not plain paths (written by another client)",
                    rest.bucket, skipped, start or "/")
    return Listed(keys, sorted(folders))


def _plain(encoded: str, under: str) -> str | None:
    """The decoded key relative to ``under`` when it is a plain printable path there; None otherwise."""
    key = urllib.parse.unquote_plus(encoded)
    if not key.startswith(under):
        return None
    rel = key[len(under):]
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts) or "\\" in rel or not rel.isprintable():
        return None
    return rel


def _contents(page: bytes) -> list[tuple[str, int]]:
    out = []
    for block in re.findall(rb"<Contents>(.*?)</Contents>", page, re.S):
        key, size = xml_text(block, "Key"), xml_text(block, "Size")
        if key is None or size is None or not size.isdigit():
            raise ListingError("a listing entry without a key or a size")
        out.append((key, int(size)))
    return out


def _all(data: bytes, name: str, within: str) -> list[str]:
    return [v for block in re.findall(rb"<" + within.encode() + rb">(.*?)</" + within.encode() + rb">", data, re.S)
            if (v := xml_text(block, name)) is not None]
