"""Request signatures: the published test vector, sign-then-verify, and every tampered field failing."""

from __future__ import annotations

import hashlib

import orjson
import pytest
from claude_gateway_client.signing import sign
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from service.admission.admit import Admission, Admitted, Record, Rejected
from service.admission.registry import Registry
from service.admission.signature import SignatureError, SignatureVerifier
from service.config.loader import parse_config
from service.contracts.reasons import Reason
from service.contracts.signing import canonical_string

TOPIC = "claude.requests.acme"
NOW_MS = 1_764_003_600_000
ENV = {"ACME_KEY": "sk-acme", "ACME_K1": "s3cr3t-k1", "ACME_K2": "s3cr3t-k2", "GLOBEX_KEY": "sk-globex"}

# docs/signing.md publishes this vector; computed independently with openssl:
#   printf 'v1\nclaude.requests.acme\nreq-0001\nreq-0001\n1764003600000\n<sha256>' \
#     | openssl dgst -sha256 -hmac s3cr3t-k2025a
VECTOR_VALUE = b'{"request_id":"req-0001"}'
VECTOR_SHA256 = "70ddca206bb16dfb73031ed4154ef78a3ad23ab4afaa001691c12325282ed689"
VECTOR_SIGNATURE = b"ae5c8ecdbd0d1f6b52a954ef16edcc630c50212a47c5902189c31e73f3c0df26"


def test_published_test_vector() -> None:
    assert hashlib.sha256(VECTOR_VALUE).hexdigest() == VECTOR_SHA256
    canonical = canonical_string(TOPIC, b"req-0001", "req-0001", "1764003600000", VECTOR_VALUE)
    assert canonical == f"v1\n{TOPIC}\nreq-0001\nreq-0001\n1764003600000\n{VECTOR_SHA256}".encode()
    headers = sign(TOPIC, b"req-0001", VECTOR_VALUE, "req-0001", "k2025a", "s3cr3t-k2025a", NOW_MS)
    assert headers == [
        ("x-gateway-key-id", b"k2025a"),
        ("x-gateway-timestamp", b"1764003600000"),
        ("x-gateway-signature", VECTOR_SIGNATURE),
    ]


def test_no_key_signs_as_empty_line_and_non_utf8_key_cannot_be_signed() -> None:
    assert canonical_string(TOPIC, None, "r", "1", b"").split(b"\n")[2] == b""
    with pytest.raises(ValueError, match="UTF-8"):
        sign(TOPIC, b"\xff", b"{}", "r", "k1", "s", NOW_MS)


# -- verification through admission -------------------------------------------------------


def _admission(required: bool = True, now_ms: int = NOW_MS, **signing: object) -> Admission:
    settings_ = parse_config(
        {
            "partners": [
                {
                    "id": "acme",
                    "api_key": {"env": "ACME_KEY"},
                    "signing": {
                        "required": required,
                        "keys": {"k1": {"env": "ACME_K1"}, "k2": {"env": "ACME_K2"}},
                        "max_skew_s": 300,
                        **signing,
                    },
                },
                {"id": "globex", "api_key": {"env": "GLOBEX_KEY"}},
            ]
        }
    )
    return Admission(
        Registry.build(settings_, environ=ENV), signatures=SignatureVerifier(clock=lambda: now_ms / 1000)
    )


def _value(rid: str = "r-1", **extra: object) -> bytes:
    doc = {
        "request_id": rid,
        "params": {
            "model": "claude-haiku-4-5",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
        },
        **extra,
    }
    return orjson.dumps(doc)


def _signed(
    value: bytes | None = None,
    *,
    key: bytes | None = b"r-1",
    rid: str = "r-1",
    key_id: str = "k1",
    secret: str = "s3cr3t-k1",
    ts: int = NOW_MS,
    topic: str = TOPIC,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    value = value if value is not None else _value(rid)
    return value, sign(topic, key, value, rid, key_id, secret, ts)


def _verdict(adm: Admission, value: bytes, headers: list[tuple[str, bytes]], key: bytes | None = b"r-1"):
    return adm.admit(Record(TOPIC, 0, 7, NOW_MS, key, value, tuple(headers)))


def _reason(adm: Admission, value: bytes, headers: list[tuple[str, bytes]], key: bytes | None = b"r-1"):
    verdict = _verdict(adm, value, headers, key)
    assert isinstance(verdict, Rejected), "expected a rejection"
    assert verdict.detail
    assert "s3cr3t" not in verdict.detail
    return verdict.reason


@pytest.mark.parametrize("key_id", ["k1", "k2"])
def test_signed_with_either_current_key_is_admitted(key_id: str) -> None:
    value, headers = _signed(key_id=key_id, secret=ENV[f"ACME_{key_id.upper()}"])
    assert isinstance(_verdict(_admission(), value, headers), Admitted)


def test_uppercase_hex_is_accepted() -> None:
    value, headers = _signed()
    headers[2] = (headers[2][0], headers[2][1].upper())
    assert isinstance(_verdict(_admission(), value, headers), Admitted)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("value", Reason.BAD_SIGNATURE),
        ("key", Reason.BAD_SIGNATURE),
        ("no_key", Reason.BAD_SIGNATURE),
        ("request_id", Reason.BAD_SIGNATURE),
        ("topic", Reason.BAD_SIGNATURE),
        ("timestamp", Reason.BAD_SIGNATURE),
        ("secret", Reason.BAD_SIGNATURE),
        ("signature", Reason.BAD_SIGNATURE),
        ("key_id_swapped", Reason.BAD_SIGNATURE),
        ("key_id_unknown", Reason.UNKNOWN_SIGNING_KEY),
        ("key_id_not_ascii", Reason.UNKNOWN_SIGNING_KEY),
        ("timestamp_not_decimal", Reason.STALE_TIMESTAMP),
    ],
)
def test_each_tampered_field_fails(tamper: str, reason: Reason) -> None:
    adm = _admission()
    value, headers = _signed()
    key: bytes | None = b"r-1"
    h = dict(headers)
    if tamper == "value":
        value = _value("r-1", metadata={"x": "y"})
    elif tamper == "key":
        key = b"r-2"
    elif tamper == "no_key":
        key = None
    elif tamper == "request_id":
        value = _value("r-2")
    elif tamper == "topic":
        value, headers = _signed(topic="claude.requests.globex")
        h = dict(headers)
    elif tamper == "timestamp":
        h["x-gateway-timestamp"] = str(NOW_MS - 1).encode()
    elif tamper == "secret":
        h = dict(_signed(secret="s3cr3t-k3")[1])
    elif tamper == "signature":
        sig = bytearray(h["x-gateway-signature"])
        sig[10] = ord("0") if sig[10] != ord("0") else ord("1")
        h["x-gateway-signature"] = bytes(sig)
    elif tamper == "key_id_swapped":
        h["x-gateway-key-id"] = b"k2"
    elif tamper == "key_id_unknown":
        h["x-gateway-key-id"] = b"k9"
    elif tamper == "key_id_not_ascii":
        h["x-gateway-key-id"] = b"k\xff"
    elif tamper == "timestamp_not_decimal":
        h["x-gateway-timestamp"] = b"-1764003600000"
    assert _reason(adm, value, list(h.items()), key) is reason


@pytest.mark.parametrize("drop", ["x-gateway-key-id", "x-gateway-timestamp", "x-gateway-signature", "all"])
def test_missing_headers(drop: str) -> None:
    value, headers = _signed()
    kept = [] if drop == "all" else [(k, v) for k, v in headers if k != drop]
    assert _reason(_admission(), value, kept) is Reason.MISSING_SIGNATURE


def test_duplicate_header_is_refused() -> None:
    value, headers = _signed()
    assert _reason(_admission(), value, [*headers, headers[2]]) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("offset_ms", "ok"),
    [(0, True), (300_000, True), (-300_000, True), (300_001, False), (-300_001, False), (-86_400_000, False)],
)
def test_timestamp_skew(offset_ms: int, ok: bool) -> None:
    value, headers = _signed(ts=NOW_MS + offset_ms)
    verdict = _verdict(_admission(), value, headers)
    if ok:
        assert isinstance(verdict, Admitted)
    else:
        assert isinstance(verdict, Rejected)
        assert verdict.reason is Reason.STALE_TIMESTAMP
        assert "max_skew_s" in verdict.detail


def test_unsigned_partner_passes_unsigned_but_verifies_when_signed() -> None:
    adm = _admission(required=False)
    assert isinstance(_verdict(adm, _value(), []), Admitted)
    value, headers = _signed()
    assert isinstance(_verdict(adm, value, headers), Admitted)
    assert _reason(adm, value, headers[:2]) is Reason.MISSING_SIGNATURE
    assert (
        _reason(adm, value, [headers[0], headers[1], ("x-gateway-signature", b"00")]) is Reason.BAD_SIGNATURE
    )


def test_non_utf8_record_key_is_a_bad_signature() -> None:
    value, headers = _signed()
    assert _reason(_admission(), value, headers, key=b"\xff\xfe") is Reason.BAD_SIGNATURE


def test_signature_is_checked_after_decoding_and_before_policy() -> None:
    adm = _admission()
    assert _reason(adm, b"{broken", []) is Reason.MALFORMED_JSON
    value = _value(partner="globex")
    assert _reason(adm, value, []) is Reason.MISSING_SIGNATURE
    _, headers = _signed(value)
    assert _reason(adm, value, headers) is Reason.IDENTITY_MISMATCH


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_of_the_value_breaks_the_signature(position: int, bit: int) -> None:
    verifier = SignatureVerifier(clock=lambda: NOW_MS / 1000)
    adm = _admission()
    partner = adm.registry.by_id["acme"]
    value, headers = _signed()
    flipped = bytearray(value)
    flipped[position % len(value)] ^= 1 << bit
    with pytest.raises(SignatureError) as caught:
        verifier.verify(
            topic=TOPIC, key=b"r-1", value=bytes(flipped), headers=headers, request_id="r-1", partner=partner
        )
    assert caught.value.reason is Reason.BAD_SIGNATURE


def test_secret_never_in_repr_of_partner() -> None:
    partner = _admission().registry.by_id["acme"]
    assert isinstance(partner.signing_keys["k1"], SecretStr)
    assert "s3cr3t" not in repr(partner)


def test_broker_append_time_is_the_reference_when_the_topic_keeps_it() -> None:
    adm = _admission(now_ms=NOW_MS + 3_600_000)  # read an hour later: a backlog
    value, headers = _signed()
    waited = Record(TOPIC, 0, 7, NOW_MS + 1_000, b"r-1", value, tuple(headers), timestamp_type=1)
    assert isinstance(adm.admit(waited), Admitted), "appended in time, processed late: not stale"
    copied_later = Record(TOPIC, 0, 8, NOW_MS + 3_000_000, b"r-1", value, tuple(headers), timestamp_type=1)
    verdict = adm.admit(copied_later)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.STALE_TIMESTAMP
    assert "before the broker appended it" in verdict.detail
    create_time = Record(TOPIC, 0, 9, NOW_MS, b"r-1", value, tuple(headers), timestamp_type=0)
    verdict = adm.admit(create_time)
    assert isinstance(verdict, Rejected), (
        "a producer-chosen CreateTime proves nothing: the gateway's clock decides"
    )
    assert "before the gateway read it" in verdict.detail
