#!/usr/bin/python3
"""Writes tests/vectors/eip191.json: EIP-191 personal_sign vectors made by an
implementation independent of common/id.c (python3-ecdsa's RFC 6979 signing
with HMAC-SHA256, normalised to low s with v fixed by recovery, and
pycryptodome's Keccak-256; see eip191_ref.py).

Run from anywhere: /usr/bin/python3 tests/vectors/gen_eip191.py
The output is deterministic; tests/unit/test_id.c reads it (VECTORS_DIR).
"""

import json
import os
import sys

import ecdsa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eip191_ref as ref  # noqa: E402  (after the path tweak)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eip191.json")

# The private key web3.js and ethers use in their documentation.
WELL_KNOWN = 0x4C0883A69102937D6231471B5DBB6204FE5129617082792AE468D01A3F362318

# Published: web3.js docs, web3.eth.accounts.sign('Some data', WELL_KNOWN).
WEB3_SOME_DATA_SIG = ("0xb91467e570a6466aa9e9876cbcd013baba02900b8979d43fe208a4a4f339f5fd"
                      "6007e74cd82e037b800186422fc2da167c747ef045e5d18a5f5d4300f8e1a0291c")
WEB3_SOME_DATA_HASH = "0x1da44b586eb0729ff70a73c326926f6ed5a25f5b056e7f47fbc6e58d86871655"
WELL_KNOWN_ADDRESS = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"

# EIP-55's own test cases (eips.ethereum.org/EIPS/eip-55, "Test Cases").
EIP55_CASES = [
    "0x52908400098527886E0F7030069857D2E4169EE7",
    "0x8617E340B3D01FA5F11F306F4090FD50E238070D",
    "0xde709f2102306220921060314715629080e2fb77",
    "0x27b1fdb04752bbc536007a920d24acb045561c26",
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
    "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
]


def derived_key(i: int) -> int:
    """A reproducible test key: keccak256("tunnel-gateway test key <i>") mod (n-1) + 1."""
    h = ref.keccak256(b"tunnel-gateway test key %d" % i)
    return int.from_bytes(h, "big") % (ref.N - 1) + 1


def ten_kib() -> bytes:
    line = b"The quick brown fox jumps over the lazy dog. 0123456789\n"  # 56 bytes
    return (line * (10240 // len(line) + 1))[:10240]


# (name, private key, message bytes)
CASES = [
    ("empty message, well-known key", WELL_KNOWN, b""),
    ("web3.js docs: 'Some data', well-known key", WELL_KNOWN, b"Some data"),
    ("ascii word", derived_key(1), b"hello"),
    ("ascii sentence", derived_key(2), b"The quick brown fox jumps over the lazy dog"),
    ("one byte", derived_key(3), b"a"),
    ("one NUL byte", derived_key(4), b"\x00"),
    ("9 bytes (one length digit)", derived_key(5), b"123456789"),
    ("10 bytes (two length digits)", derived_key(6), b"1234567890"),
    ("utf-8 latin accents", derived_key(7), "héllo wörld — ünïcödé".encode()),
    ("utf-8 emoji", derived_key(8), "🔑🚀 tunnel ✓ 👩‍💻".encode()),
    ("utf-8 CJK", derived_key(9), "你好，世界。トンネル".encode()),
    ("multi-line LF and CRLF", derived_key(10), b"line one\nline two\r\nline three\n"),
    ("10 KiB ascii", derived_key(11), ten_kib()),
    ("looks like hex with 0x (signed as text)", derived_key(12), b"0x68656c6c6f"),
    ("looks like hex without 0x", derived_key(13), b"deadbeefcafebabe"),
    ("binary, invalid utf-8", derived_key(14), bytes(range(256))[::7] + b"\xff\xfe\x00\x80"),
    ("whitespace only", derived_key(15), b"  \t \n"),
    ("json", derived_key(16), b'{"type":"auth","nonce":"00","timestamp":1700000000}'),
    ("contains the EIP-191 prefix", derived_key(17),
     b"\x19Ethereum Signed Message:\n5hello"),
    ("osaurus auth text, EIP-55 address",
     derived_key(18),
     ("osaurus-tunnel:%s:%s:1767225600" % (
         ref.to_checksum(ref.address_from_priv(derived_key(18))),
         "ab" * 32)).encode()),
    ("106 bytes (26 prefix + 3 length digits + 106 = 135 hashed bytes)",
     derived_key(19), b"w" * 106),
    ("107 bytes (136 hashed bytes, one full Keccak block)", derived_key(20), b"x" * 107),
    ("108 bytes (137 hashed bytes)", derived_key(22), b"y" * 108),
    ("1000 bytes", derived_key(21), bytes((i * 31 + 7) & 0xFF for i in range(1000))),
    ("private key 1", 1, b"test"),
    ("private key 2", 2, b"test"),
    ("private key n-1", ref.N - 1, b"test"),
    ("well-known key, ascii", WELL_KNOWN, b"tunnel-gateway"),
    ("well-known key, utf-8", WELL_KNOWN, "Grüße 🌍".encode()),
]


def readable(msg: bytes):
    try:
        return msg.decode("utf-8")
    except UnicodeDecodeError:
        return None


def main() -> int:
    vectors = []
    for name, d, msg in CASES:
        addr = ref.address_from_priv(d)
        sig = ref.sign(d, msg)
        sig_hex = "0x" + sig.hex()
        # Self-checks with the reference's own verifier.
        assert ref.recover_address(msg, sig) == addr, name
        assert ref.verify(ref.to_checksum(addr), msg, sig_hex), name
        assert int.from_bytes(sig[32:64], "big") <= ref.HALF_N, name
        v = {
            "name": name,
            "privkey": "0x%064x" % d,
            "message": readable(msg),
            "message_hex": msg.hex(),
            "hash": "0x" + ref.eip191_hash(msg).hex(),
            "address": "0x" + addr.hex(),
            "address_checksum": ref.to_checksum(addr),
            "signature": sig_hex,
        }
        vectors.append(v)

    # The independent implementation must reproduce the published web3.js vector.
    web3 = vectors[1]
    assert web3["signature"] == WEB3_SOME_DATA_SIG, web3["signature"]
    assert web3["hash"] == WEB3_SOME_DATA_HASH
    assert web3["address_checksum"] == WELL_KNOWN_ADDRESS
    web3["source"] = "web3.js documentation, web3.eth.accounts.sign"
    # Both recovery ids must be covered.
    assert {v["signature"][-2:] for v in vectors} == {"1b", "1c"}

    for a in EIP55_CASES:
        assert ref.to_checksum(bytes.fromhex(a[2:])) == a, a

    doc = {
        "comment": "Generated by tests/vectors/gen_eip191.py with python3-ecdsa %s "
                   "(RFC 6979, HMAC-SHA256, then low s) and pycryptodome Keccak-256. "
                   "Do not edit by hand." % ecdsa.__version__,
        "eip55": EIP55_CASES,
        "vectors": vectors,
    }
    with open(OUT + ".tmp", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(OUT + ".tmp", OUT)
    print("wrote %d vectors and %d EIP-55 cases to %s" % (len(vectors), len(EIP55_CASES), OUT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
