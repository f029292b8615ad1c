"""The API's image intake: every `image_url` part becomes a decoded RGB image, or a 400 that names the part.

Accepted: base64 `data:` URLs always; `http(s)` URLs only when the operator starts the server with
`--allow-remote-urls`. Local paths and `file://` URLs are never read. A remote fetch is guarded against being
turned on the operator's own network (server-side request forgery):

* the host must resolve to public addresses only; loopback, private, link-local (cloud metadata at 169.254.169.254),
  multicast and reserved addresses are refused unless `--allow-private-urls`;
* redirects are not followed (a public URL could otherwise bounce to an internal one);
* the body is read with a size limit and a total deadline.

The address is checked when the URL is resolved, not pinned for the connection: a hostile DNS server answering
differently a moment later (rebinding) is not stopped here; operators who need that run the server behind an
egress proxy. Every image is then decoded once, here (in a worker thread, not in the engine's), under the server's
pixel limit `--max-image-pixels`; the engine takes the decoded image as it is.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from mlcd_vl.serve.api_schema import APIError


@dataclass(kw_only=True)  # keyword-only, so `api.ServerOptions` can add positional fields
class IntakeOptions:
    allow_remote_urls: bool = False
    allow_private_urls: bool = False  # remote URLs may point at loopback / private / link-local addresses
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 * 1024 * 1024
    remote_timeout_s: float = 10.0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: PLR0913 - urllib's signature
        raise urllib.error.URLError(f"redirected ({code}) to {newurl}; redirects are not followed")


_OPENER = urllib.request.build_opener(_NoRedirects)


def check_host(url: str, options: IntakeOptions) -> None:
    """Refuse URLs whose host resolves to a non-public address (unless private URLs are allowed)."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        raise APIError(400, f"{url}: the URL has no host")
    if options.allow_private_urls:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError) as error:
        raise APIError(400, f"cannot fetch {url}: cannot resolve {host} ({error})") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise APIError(400, f"{url}: {host} resolves to the non-public address {address}; this server fetches "
                                "public URLs only (start it with --allow-private-urls to permit it)",
                           code="private_url_refused")


def fetch_remote(url: str, options: IntakeOptions) -> bytes:
    """GET an image from a public host, without redirects, with a total deadline and a size limit."""
    check_host(url, options)
    deadline = time.monotonic() + options.remote_timeout_s
    try:
        with _OPENER.open(urllib.request.Request(url, headers={"User-Agent": "mlcd-vl"}),
                          timeout=options.remote_timeout_s) as response:
            data = bytearray()
            while piece := response.read(65536):
                data += piece
                if len(data) > options.max_image_bytes:
                    raise APIError(400, f"{url}: the image is larger than {options.max_image_bytes} bytes")
                if time.monotonic() > deadline:
                    raise APIError(400, f"{url}: fetching took longer than {options.remote_timeout_s} s")
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise APIError(400, f"cannot fetch {url}: {getattr(error, 'reason', error)}") from error
    return bytes(data)


def image_bytes(url: str, options: IntakeOptions, where: str) -> bytes:
    """The bytes of one `image_url`: a base64 data URL decoded, or a permitted remote URL fetched; not too large."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or ";base64" not in header:
            raise APIError(400, f"{where}: image data URLs must be base64 (data:image/png;base64,...)", param=where)
        payload = "".join(payload.split())
        if len(payload) * 3 // 4 > options.max_image_bytes:
            raise APIError(400, f"{where}: the image is larger than {options.max_image_bytes} bytes", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the image data URL is not valid base64", param=where) from None
    elif url.startswith(("http://", "https://")):
        if not options.allow_remote_urls:
            raise APIError(400, f"{where}: remote image URLs are not fetched by this server; send the image as a "
                                "base64 data URL (data:image/png;base64,...), or start the server with "
                                "--allow-remote-urls", param=where, code="remote_urls_disabled")
        data = fetch_remote(url, options)
    else:
        raise APIError(400, f"{where}: image_url must be a base64 data: URL"
                            + (" or an http(s) URL" if options.allow_remote_urls else ""), param=where)
    return data


def load_image(url: str, options: IntakeOptions, where: str):
    """One `image_url` decoded to an RGB PIL image, at most `max_image_pixels` pixels."""
    from mlcd_vl.model.pixels import ImageError, load_rgb

    try:
        return load_rgb(image_bytes(url, options, where), max_pixels=options.max_image_pixels)
    except ImageError as error:
        too_large = "pixel limit" in str(error) or "decompression bomb" in str(error)
        reason = str(error).removeprefix("<image bytes>: ").removeprefix("cannot read image (").removesuffix(")")
        message = (f"the image has more pixels than this server accepts ({options.max_image_pixels})" if too_large
                   else f"not a readable image ({reason})")
        raise APIError(400, f"{where}: {message}", param=where,
                       code="image_too_large" if too_large else "invalid_image") from None


def resolve_images(messages: list[dict], options: IntakeOptions) -> list[dict]:
    """Replace every `image_url` part by an `image` part holding the decoded image (runs in a worker thread)."""
    for m, message in enumerate(messages):
        if not isinstance(message["content"], list):
            continue
        for p, part in enumerate(message["content"]):
            if part["type"] == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                where = f"messages[{m}].content[{p}]"
                if not url:
                    raise APIError(400, f"{where}: image_url part without a url", param=where)
                message["content"][p] = {"type": "image", "image": load_image(url, options, where)}
    return messages
