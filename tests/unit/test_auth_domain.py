"""Key and session secrets, and the input rules of signup."""
import pytest
from hypothesis import given, strategies as st

from auth_svc import domain
from common import errors


def test_keys_are_recognisable_and_self_checking():
    key = domain.new_secret(domain.KEY_PREFIX)
    assert key.startswith("tsk_") and len(key) == 4 + 32 + 6
    assert domain.well_formed(key, domain.KEY_PREFIX)
    assert not domain.well_formed(key, domain.SESSION_PREFIX)
    assert domain.new_secret(domain.KEY_PREFIX) != key


@given(st.integers(min_value=4, max_value=41), st.sampled_from("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
def test_any_single_character_change_fails_the_checksum(position, replacement):
    key = domain.new_secret(domain.KEY_PREFIX)
    changed = key[:position] + replacement + key[position + 1:]
    assert domain.well_formed(changed, domain.KEY_PREFIX) == (changed == key)


@pytest.mark.parametrize("text", ["", "tsk_", "sk-abc", "tsk_" + "!" * 38, "Bearer tsk_x"])
def test_malformed_keys(text):
    assert not domain.well_formed(text, domain.KEY_PREFIX)


@pytest.mark.parametrize("odd", ["-", "_", "\u0661", "\u00e9", "\uff21"])  # '-', '_', Arabic 1, e-acute, fullwidth A
def test_a_body_outside_base62_is_malformed_even_with_its_checksum(odd):
    body = odd + "A" * (domain._BODY_CHARS - 1)
    assert not domain.well_formed(domain.KEY_PREFIX + body + domain._checksum(body), domain.KEY_PREFIX)
    body = "B" + "A" * (domain._BODY_CHARS - 1)
    assert domain.well_formed(domain.KEY_PREFIX + body + domain._checksum(body), domain.KEY_PREFIX)


def test_hash_and_display_never_contain_the_secret():
    key = domain.new_secret(domain.KEY_PREFIX)
    assert key not in domain.secret_hash(key) and len(domain.secret_hash(key)) == 64
    shown = domain.display(key)
    assert shown.startswith("tsk_") and shown.endswith(key[-4:]) and key[8:-4] not in shown
    assert domain.same_hash(domain.secret_hash(key), domain.secret_hash(key))


@pytest.mark.parametrize("raw,normal", [("Me@Example.COM", "Me@example.com"), ("  a.b+c@d.io ", "a.b+c@d.io")])
def test_email_normalisation(raw, normal):
    assert domain.normalize_email(raw) == normal


@pytest.mark.parametrize("raw", ["", "plain", "a@b", "a@@b.com", "a b@c.com", "x" * 250 + "@e.com"])
def test_bad_emails(raw):
    with pytest.raises(errors.InvalidRequest) as caught:
        domain.normalize_email(raw)
    assert caught.value.param == "email"


@pytest.mark.parametrize("password", ["short", "password123", "1234567890", "aaaaaaaaaaaaaaa", "x" * 300,
                                      "me@example.com"])
def test_weak_passwords(password):
    with pytest.raises(errors.InvalidRequest) as caught:
        domain.check_password(password, "me@example.com", 10)
    assert caught.value.code == "weak_password"


def test_a_passphrase_passes():
    domain.check_password("correct horse battery staple", "me@example.com", 10)
