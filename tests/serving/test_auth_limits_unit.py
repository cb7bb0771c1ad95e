"""Key file, key store and rate limiter on their own (no Ray): the exact semantics the stack tests rely on."""
from __future__ import annotations

import json
import os
import stat
import time

import pytest

from serving.api.auth import KeyStore, add_key, hash_key, list_keys, parse_authorization, revoke_key
from serving.api.errors import APIError
from serving.api.ratelimit import RateLimiter


def test_key_file_holds_only_hashes(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice", requests_per_minute=10)
    text = path.read_text()
    assert key not in text and hash_key(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (record,) = list_keys(path)
    assert (record.name, record.requests_per_minute, record.tokens_per_minute) == ("alice", 10, None)
    with pytest.raises(ValueError, match="already exists"):
        add_key(path, "alice")
    with pytest.raises(ValueError, match="invalid key name"):
        add_key(path, "bad name")
    with pytest.raises(ValueError, match="requests_per_minute"):
        add_key(path, "bob", requests_per_minute=0)
    assert add_key(path, "bob") != key


@pytest.mark.parametrize("header, expected", [
    ("Bearer abc", "abc"), ("bearer   abc ", "abc"), ("abc", "abc"), ("", None), (None, None), ("Bearer ", None),
])
def test_parse_authorization(header, expected):
    assert parse_authorization(header) == expected


def test_store_accepts_raw_and_bearer_and_sees_revocation(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice")
    store = KeyStore(path, reload_interval_s=0.05)
    assert store.authenticate(key).name == "alice"
    assert store.authenticate(f"Bearer {key}").name == "alice"
    for bad in (None, "Bearer", key[:-1], key + "x"):
        with pytest.raises(APIError) as err:
            store.authenticate(bad)
        assert err.value.status == 401
    revoke_key(path, "alice")
    time.sleep(0.1)
    with pytest.raises(APIError, match="invalid or revoked"):
        store.authenticate(key)
    with pytest.raises(ValueError, match="no key named"):
        revoke_key(path, "alice")


def test_store_fails_closed_on_a_broken_file(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice")
    store = KeyStore(path, reload_interval_s=0.0)
    path.write_text(json.dumps({"keys": "oops"}))
    with pytest.raises(APIError):
        store.authenticate(key)
    path.unlink()
    with pytest.raises(APIError):
        store.authenticate(key)


async def test_rate_limits_requests_then_tokens(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "rpm", requests_per_minute=2)
    add_key(path, "tpm", tokens_per_minute=100)
    records = {r.name: r for r in list_keys(path)}
    limiter = RateLimiter("memory://")
    await limiter.acquire(records["rpm"], tokens=10**6)
    await limiter.acquire(records["rpm"], tokens=10**6)
    with pytest.raises(APIError) as err:
        await limiter.acquire(records["rpm"], tokens=1)
    assert err.value.status == 429 and 1 <= err.value.retry_after <= 60
    assert err.value.to_response().headers["retry-after"] == str(err.value.retry_after)

    await limiter.acquire(records["tpm"], tokens=60)
    with pytest.raises(APIError) as err:
        await limiter.acquire(records["tpm"], tokens=60)
    assert err.value.status == 429 and "tokens per minute" in err.value.message
    await limiter.acquire(records["tpm"], tokens=40)
    with pytest.raises(APIError) as err:
        await limiter.acquire(records["tpm"], tokens=101)
    assert err.value.status == 400 and "101 tokens" in err.value.message


async def test_refused_for_tokens_does_not_spend_a_request(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "both", requests_per_minute=2, tokens_per_minute=10)
    (record,) = list_keys(path)
    limiter = RateLimiter()
    await limiter.acquire(record, tokens=10)
    for _ in range(3):
        with pytest.raises(APIError, match="tokens per minute"):
            await limiter.acquire(record, tokens=5)
    # The refused attempts charged nothing: the second request slot is still free (with no tokens).
    await limiter.acquire(record, tokens=0)
    with pytest.raises(APIError, match="requests per minute"):
        await limiter.acquire(record, tokens=0)
