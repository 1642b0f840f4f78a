#!/usr/bin/python3
"""Independent reference for Ethereum addresses, EIP-55 and EIP-191 personal_sign.

Uses only python3-ecdsa (curve arithmetic, RFC 6979 signing) and pycryptodome
(Keccak-256), nothing from this project, so tests can check common/id.c and
`tunnel-agent sign` against a second implementation.

Rules match PRODUCT.md: signature = r || s || v (65 bytes, "0x" + 130 hex),
v in {0, 1, 27, 28}, r and s in [1, n-1], s <= n/2 (high s rejected),
verification by public-key recovery and address comparison.

CLI (exit 0 on success; `verify` exits 1 and says why on stderr if invalid):
    eip191_ref.py verify ADDRESS MESSAGE SIGNATURE [--hex]   -> prints "ok"
    eip191_ref.py sign PRIVHEX MESSAGE [--hex]                -> prints 0x + 130 hex
    eip191_ref.py address PRIVHEX [--checksum]                -> prints 0x + 40 hex
    eip191_ref.py recover MESSAGE SIGNATURE [--hex]           -> prints 0x + 40 hex
MESSAGE is taken as the raw bytes of the argument, or decoded from hex with --hex
(put "--" before the positional arguments if MESSAGE starts with "-").
Importable: sign(), verify(), recover_address(), address_from_priv(), to_checksum().
"""

import argparse
import hashlib
import os
import sys

from ecdsa import SECP256k1, SigningKey, VerifyingKey
from ecdsa.ellipticcurve import INFINITY, Point, PointJacobi
from ecdsa.numbertheory import inverse_mod
from ecdsa.util import sigdecode_strings, sigencode_strings

try:
    from Crypto.Hash import keccak as _keccak
except ImportError:  # Debian's python3-pycryptodome installs as Cryptodome
    from Cryptodome.Hash import keccak as _keccak

N = SECP256k1.order
P = SECP256k1.curve.p()
G = SECP256k1.generator
HALF_N = N // 2


class RefError(ValueError):
    """A malformed or invalid key, address or signature; str() says why."""


def keccak256(data: bytes) -> bytes:
    return _keccak.new(digest_bits=256, data=data).digest()


def eip191_hash(msg: bytes) -> bytes:
    return keccak256(b"\x19Ethereum Signed Message:\n" + str(len(msg)).encode() + msg)


def parse_priv(text: str) -> int:
    """64 hex digits, optional 0x, surrounding whitespace ignored; 1 <= d < n."""
    t = text.strip()
    if t[:2] in ("0x", "0X"):
        t = t[2:]
    if len(t) != 64 or any(c not in "0123456789abcdefABCDEF" for c in t):
        raise RefError("private key is not 64 hex digits")
    d = int(t, 16)
    if not 1 <= d < N:
        raise RefError("private key out of range")
    return d


def pub_from_priv(d: int) -> bytes:
    """Uncompressed public key without the 0x04 tag: X || Y (64 bytes)."""
    return SigningKey.from_secret_exponent(d, curve=SECP256k1).verifying_key.to_string()


def address_from_pub(pub64: bytes) -> bytes:
    return keccak256(pub64)[12:]


def address_from_priv(d: int) -> bytes:
    return address_from_pub(pub_from_priv(d))


def to_checksum(addr: bytes) -> str:
    """EIP-55 mixed-case form."""
    low = addr.hex()
    h = keccak256(low.encode()).hex()
    return "0x" + "".join(c.upper() if c in "abcdef" and int(h[i], 16) >= 8 else c
                          for i, c in enumerate(low))


def parse_address(text: str) -> bytes:
    """"0x" + 40 hex; mixed case must carry a valid EIP-55 checksum."""
    if not text.startswith("0x") or len(text) != 42:
        raise RefError("address is not 0x + 40 hex")
    body = text[2:]
    if any(c not in "0123456789abcdefABCDEF" for c in body):
        raise RefError("address is not hex")
    addr = bytes.fromhex(body)
    if body != body.lower() and body != body.upper() and to_checksum(addr) != text:
        raise RefError("bad EIP-55 checksum")
    return addr


def recover_pub(digest: bytes, r: int, s: int, recid: int):
    """Public key (64 bytes) for which (r, s) with recovery id 0/1 verifies digest.

    SEC 1 v2, 4.1.6: R = (r, y) with y's parity = recid; Q = r^-1 (sR - eG).
    """
    alpha = (pow(r, 3, P) + 7) % P
    beta = pow(alpha, (P + 1) // 4, P)
    if beta * beta % P != alpha:
        return None
    y = beta if beta % 2 == recid else P - beta
    big_r = PointJacobi.from_affine(Point(SECP256k1.curve, r, y, N))
    e = int.from_bytes(digest, "big") % N
    q = (big_r * s + G * ((-e) % N)) * inverse_mod(r, N)
    if q == INFINITY:
        return None
    vk = VerifyingKey.from_public_point(q, curve=SECP256k1)
    # Belt and braces: the recovered key must verify the signature the ordinary way.
    if not vk.verify_digest(sigencode_strings(r, s, N), digest, sigdecode=sigdecode_strings):
        return None
    return vk.to_string()


def sign(d: int, msg: bytes) -> bytes:
    """EIP-191 personal_sign: RFC 6979 (HMAC-SHA256) nonce, low s, v = 27/28."""
    digest = eip191_hash(msg)
    sk = SigningKey.from_secret_exponent(d, curve=SECP256k1, hashfunc=hashlib.sha256)
    r_b, s_b = sk.sign_digest_deterministic(digest, hashfunc=hashlib.sha256,
                                            sigencode=sigencode_strings)
    r = int.from_bytes(r_b, "big")
    s = int.from_bytes(s_b, "big")
    if s > HALF_N:
        s = N - s  # (r, n - s) is the same signature with R's y negated
    pub = pub_from_priv(d)
    for recid in (0, 1):
        if recover_pub(digest, r, s, recid) == pub:
            return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([27 + recid])
    raise RefError("no recovery id reproduces the key")  # R.x >= n: p ~ 2^-127


def parse_sig(text: str) -> bytes:
    if not text.startswith("0x"):
        raise RefError("signature lacks 0x")
    body = text[2:]
    if any(c not in "0123456789abcdefABCDEF" for c in body):
        raise RefError("signature is not hex")
    if len(body) != 130:
        raise RefError("signature is not 65 bytes")
    return bytes.fromhex(body)


def recover_address(msg: bytes, sig: bytes) -> bytes:
    """Signer's address; raises RefError naming the first defect found."""
    if len(sig) != 65:
        raise RefError("signature is not 65 bytes")
    v = sig[64]
    if v in (0, 1):
        recid = v
    elif v in (27, 28):
        recid = v - 27
    else:
        raise RefError("bad v %d" % v)
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:64], "big")
    if not (1 <= r < N and 1 <= s < N):
        raise RefError("r or s out of range")
    if s > HALF_N:
        raise RefError("high s")
    pub = recover_pub(eip191_hash(msg), r, s, recid)
    if pub is None:
        raise RefError("no public key recovers")
    return address_from_pub(pub)


def verify(address: str, msg: bytes, signature: str) -> bool:
    """True if signature is address's EIP-191 signature of msg."""
    try:
        return recover_address(msg, parse_sig(signature)) == parse_address(address)
    except RefError:
        return False


def _message(arg: str, is_hex: bool) -> bytes:
    if is_hex:
        t = arg[2:] if arg.startswith("0x") else arg
        return bytes.fromhex(t)
    return os.fsencode(arg)  # the argument's bytes exactly as passed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("verify")
    p.add_argument("address")
    p.add_argument("message")
    p.add_argument("signature")
    p.add_argument("--hex", action="store_true", help="MESSAGE is hex")
    p = sub.add_parser("sign")
    p.add_argument("privhex")
    p.add_argument("message")
    p.add_argument("--hex", action="store_true", help="MESSAGE is hex")
    p = sub.add_parser("address")
    p.add_argument("privhex")
    p.add_argument("--checksum", action="store_true", help="print the EIP-55 form")
    p = sub.add_parser("recover")
    p.add_argument("message")
    p.add_argument("signature")
    p.add_argument("--hex", action="store_true", help="MESSAGE is hex")
    a = ap.parse_args(argv)

    try:
        if a.cmd == "verify":
            want = parse_address(a.address)
            got = recover_address(_message(a.message, a.hex), parse_sig(a.signature))
            if got != want:
                raise RefError("signed by 0x%s, not %s" % (got.hex(), a.address))
            print("ok")
        elif a.cmd == "sign":
            print("0x" + sign(parse_priv(a.privhex), _message(a.message, a.hex)).hex())
        elif a.cmd == "address":
            addr = address_from_priv(parse_priv(a.privhex))
            print(to_checksum(addr) if a.checksum else "0x" + addr.hex())
        else:
            sig = parse_sig(a.signature)
            print("0x" + recover_address(_message(a.message, a.hex), sig).hex())
    except (RefError, ValueError) as e:
        print("invalid: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
