"""Private keys and certificate requests for the node agent, made with OpenSSL's libcrypto.

The agent needs three things from an X.509 library, all at moments it signs in to the
controller: an EC P-256 key, a certificate request signed by it (empty subject, the
SPIFFE ID as a critical URI SAN when it names one), and a check that a key kept on disk is
such a key. `cryptography` did them at the price of its own OpenSSL build and bindings
mapped for the agent's whole life (about 8 MB of RSS in a lab agent, issue 16). Here they
are calls into the libcrypto that Python's `ssl` module is already linked against, so no
second copy is loaded: one function per step, every result checked, every object freed.
The controller (which parses and issues certificates) keeps `cryptography`; tests check
what is made here with it.

Keys are PEM (PKCS #8, unencrypted) bytes, the form the agent stores and hands to
`ssl.SSLContext` (agent/identity/tls.py); OpenSSL objects live only inside one call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["KeyError_", "check_key", "make_csr", "new_key", "new_key_and_csr"]

_P = ctypes.c_void_p
NID_SUBJECT_ALT_NAME = 85
BIO_CTRL_INFO = 3
EVP_PKEY_EC = 408
CURVE = b"prime256v1"  # P-256; OpenSSL also answers "P-256" to get_group_name
_NO_PASSPHRASE = ctypes.c_char_p(b"")
_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9.\-_]+(/[A-Za-z0-9.\-_]+)+")


class KeyError_(ValueError):
    """libcrypto refused: the step and OpenSSL's reason."""


def _load() -> ctypes.CDLL:
    """The libcrypto the ssl module is linked against (found in /proc/self/maps, so no
    second copy is mapped), else the system's; either way the same OpenSSL version as
    ssl's, or ImportError (a second OpenSSL would be loaded into the agent, or an older one
    without these calls)."""
    path = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            name = line.rstrip().removesuffix(" (deleted)").rpartition(" ")[2]
            if "/libcrypto.so" in name:
                path = name
                break
    path = path or ctypes.util.find_library("crypto")
    if path is None:
        raise ImportError("libcrypto not found")
    lib = ctypes.CDLL(path)
    version = lib.OpenSSL_version_num
    version.restype = ctypes.c_ulong
    version.argtypes = []
    if version() != ssl.OPENSSL_VERSION_NUMBER or ssl.OPENSSL_VERSION_INFO < (3, 0):
        raise ImportError(
            f"{path} is OpenSSL {version():#x}, the ssl module's {ssl.OPENSSL_VERSION_NUMBER:#x}"
            " (3.0 or later is needed, and the same library)"
        )
    return lib


_lib = _load()


def _fn(name: str, restype: object, *argtypes: object) -> Callable[..., Any]:
    """A libcrypto function with its C signature declared (pointers must not pass through
    ctypes' default int, which would cut them to 32 bits)."""
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_ERR_get_error = _fn("ERR_get_error", ctypes.c_ulong)
_ERR_error_string_n = _fn(
    "ERR_error_string_n", None, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t
)
_ERR_clear_error = _fn("ERR_clear_error", None)
_BIO_s_mem = _fn("BIO_s_mem", _P)
_BIO_new = _fn("BIO_new", _P, _P)
_BIO_new_mem_buf = _fn("BIO_new_mem_buf", _P, ctypes.c_char_p, ctypes.c_int)
_BIO_free = _fn("BIO_free", ctypes.c_int, _P)
_BIO_ctrl = _fn("BIO_ctrl", ctypes.c_long, _P, ctypes.c_int, ctypes.c_long, _P)
_PKEY_CTX_new_from_name = _fn("EVP_PKEY_CTX_new_from_name", _P, _P, ctypes.c_char_p, _P)
_PKEY_CTX_free = _fn("EVP_PKEY_CTX_free", None, _P)
_PKEY_keygen_init = _fn("EVP_PKEY_keygen_init", ctypes.c_int, _P)
_PKEY_CTX_set_group_name = _fn("EVP_PKEY_CTX_set_group_name", ctypes.c_int, _P, ctypes.c_char_p)
_PKEY_generate = _fn("EVP_PKEY_generate", ctypes.c_int, _P, ctypes.POINTER(_P))
_PKEY_free = _fn("EVP_PKEY_free", None, _P)
_PKEY_get_base_id = _fn("EVP_PKEY_get_base_id", ctypes.c_int, _P)
_PKEY_get_group_name = _fn(
    "EVP_PKEY_get_group_name",
    ctypes.c_int,
    _P,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_size_t),
)
_PEM_write_bio_PrivateKey = _fn(
    "PEM_write_bio_PrivateKey", ctypes.c_int, _P, _P, _P, _P, ctypes.c_int, _P, _P
)
_PEM_read_bio_PrivateKey = _fn("PEM_read_bio_PrivateKey", _P, _P, _P, _P, _P)
_REQ_new = _fn("X509_REQ_new", _P)
_REQ_free = _fn("X509_REQ_free", None, _P)
_REQ_set_version = _fn("X509_REQ_set_version", ctypes.c_int, _P, ctypes.c_long)
_REQ_set_pubkey = _fn("X509_REQ_set_pubkey", ctypes.c_int, _P, _P)
_REQ_add_extensions = _fn("X509_REQ_add_extensions", ctypes.c_int, _P, _P)
_REQ_sign = _fn("X509_REQ_sign", ctypes.c_int, _P, _P, _P)
_PEM_write_bio_X509_REQ = _fn("PEM_write_bio_X509_REQ", ctypes.c_int, _P, _P)
_EXT_conf_nid = _fn("X509V3_EXT_conf_nid", _P, _P, _P, ctypes.c_int, ctypes.c_char_p)
_EXT_free = _fn("X509_EXTENSION_free", None, _P)
_sk_new_null = _fn("OPENSSL_sk_new_null", _P)
_sk_push = _fn("OPENSSL_sk_push", ctypes.c_int, _P, _P)
_sk_free = _fn("OPENSSL_sk_free", None, _P)
_EVP_sha256 = _fn("EVP_sha256", _P)


def _fail(step: str) -> KeyError_:
    codes = []
    while code := _ERR_get_error():
        buf = ctypes.create_string_buffer(256)
        _ERR_error_string_n(code, buf, len(buf))
        codes.append(buf.value.decode(errors="replace"))
    return KeyError_(f"{step}: {'; '.join(codes) or 'failed'}")


def _ok(result: int, step: str) -> None:
    if result != 1:
        raise _fail(step)


def _ptr(result: int | None, step: str) -> int:
    if not result:
        raise _fail(step)
    return result


@contextmanager
def _owned(ptr: int, free: Callable[[int], object]) -> Iterator[int]:
    try:
        yield ptr
    finally:
        free(ptr)


def _bio_bytes(bio: int) -> bytes:
    data = _P()
    n = _BIO_ctrl(bio, BIO_CTRL_INFO, 0, ctypes.cast(ctypes.pointer(data), _P))
    return ctypes.string_at(data.value, n) if n > 0 and data.value else b""


@contextmanager
def _read_key(key_pem: bytes) -> Iterator[int]:
    _ERR_clear_error()
    with _owned(_ptr(_BIO_new_mem_buf(key_pem, len(key_pem)), "BIO_new_mem_buf"), _BIO_free) as b:
        # An empty passphrase given: an encrypted key fails here instead of OpenSSL's
        # default callback asking for one on the terminal.
        pkey = _ptr(
            _PEM_read_bio_PrivateKey(b, None, None, ctypes.cast(_NO_PASSPHRASE, _P)),
            "reading the private key",
        )
    with _owned(pkey, _PKEY_free):
        yield pkey


def _is_p256(pkey: int) -> bool:
    if _PKEY_get_base_id(pkey) != EVP_PKEY_EC:
        return False
    name = ctypes.create_string_buffer(64)
    size = ctypes.c_size_t()
    if _PKEY_get_group_name(pkey, name, len(name), ctypes.byref(size)) != 1:
        return False
    return name.value in (CURVE, b"P-256")


@contextmanager
def _generated() -> Iterator[int]:
    _ERR_clear_error()
    ctx = _ptr(_PKEY_CTX_new_from_name(None, b"EC", None), "EVP_PKEY_CTX_new_from_name")
    with _owned(ctx, _PKEY_CTX_free):
        _ok(_PKEY_keygen_init(ctx), "EVP_PKEY_keygen_init")
        _ok(_PKEY_CTX_set_group_name(ctx, CURVE), "EVP_PKEY_CTX_set_group_name")
        pkey = _P()
        _ok(_PKEY_generate(ctx, ctypes.byref(pkey)), "EVP_PKEY_generate")
    with _owned(_ptr(pkey.value, "EVP_PKEY_generate"), _PKEY_free) as pk:
        yield pk


def _pem(pkey: int) -> bytes:
    with _owned(_ptr(_BIO_new(_BIO_s_mem()), "BIO_new"), _BIO_free) as bio:
        _ok(_PEM_write_bio_PrivateKey(bio, pkey, None, None, 0, None, None), "writing the key")
        return _bio_bytes(bio)


def _csr(pkey: int, spiffe_id: str | None) -> bytes:
    if spiffe_id is not None and not _SPIFFE_ID.fullmatch(spiffe_id):
        # Also keeps OpenSSL's config syntax out of the SAN value ("," starts another).
        raise KeyError_(f"not a SPIFFE ID: {spiffe_id!r}")
    with _owned(_ptr(_REQ_new(), "X509_REQ_new"), _REQ_free) as req:
        _ok(_REQ_set_version(req, 0), "X509_REQ_set_version")
        _ok(_REQ_set_pubkey(req, pkey), "X509_REQ_set_pubkey")
        if spiffe_id:
            value = f"critical,URI:{spiffe_id}".encode()
            ext = _ptr(_EXT_conf_nid(None, None, NID_SUBJECT_ALT_NAME, value), "the URI SAN")
            with _owned(ext, _EXT_free), _owned(_ptr(_sk_new_null(), "stack"), _sk_free) as sk:
                if _sk_push(sk, ext) <= 0:
                    raise _fail("stack push")
                _ok(_REQ_add_extensions(req, sk), "X509_REQ_add_extensions")
        if _REQ_sign(req, pkey, _EVP_sha256()) <= 0:  # returns the signature's size
            raise _fail("X509_REQ_sign")
        with _owned(_ptr(_BIO_new(_BIO_s_mem()), "BIO_new"), _BIO_free) as bio:
            _ok(_PEM_write_bio_X509_REQ(bio, req), "writing the request")
            return _bio_bytes(bio)


def new_key() -> bytes:
    """A new EC P-256 private key, PEM (PKCS #8)."""
    with _generated() as pkey:
        return _pem(pkey)


def new_key_and_csr(spiffe_id: str | None) -> tuple[bytes, bytes]:
    """A new key and a request signed with it (as make_csr), without parsing the key
    back from PEM (OpenSSL's decoders cost most of a millisecond)."""
    with _generated() as pkey:
        return _pem(pkey), _csr(pkey, spiffe_id)


def check_key(key_pem: bytes) -> None:
    """Raises KeyError_ unless `key_pem` is an unencrypted EC P-256 private key."""
    with _read_key(key_pem) as pkey:
        if not _is_p256(pkey):
            raise KeyError_("the private key is not an EC P-256 key")


def make_csr(key_pem: bytes, spiffe_id: str | None) -> bytes:
    """A PEM certificate request signed with `key_pem` (SHA-256), with an empty subject and,
    when `spiffe_id` is given, that ID as its one URI SAN, critical (the CA checks it)."""
    with _read_key(key_pem) as pkey:
        return _csr(pkey, spiffe_id)
