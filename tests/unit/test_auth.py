"""ServerAuth against ClientAuth in memory, the users file, and SCRAM verifier formats."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from scramp import ScramClient, ScramMechanism

from pgquorum.protocol.auth import (
    METHODS,
    ClientAuth,
    ServerAuth,
    UserSecret,
    load_users,
    make_scram_verifier,
    md5_secret,
    parse_scram_verifier,
)
from pgquorum.protocol.errors import PgError, ProtocolViolation
from pgquorum.protocol.framing import Framer
from pgquorum.protocol.messages import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    AUTHENTICATION,
    PASSWORD,
    encode_auth,
    encode_password,
    encode_sasl_initial,
    parse_auth_request,
    parse_password,
    parse_sasl_initial,
)

# As PostgreSQL 15 stored it for CREATE USER scramuser PASSWORD 'scrampw'.
PG_VERIFIER = (
    "SCRAM-SHA-256$4096:vdLZ0Bf/CF1D2RCLeCKkIg==$+MXk5dynNj8FwBKSW4oNnNx7Y30OVLVpRtmL7lxXiXM="
    ":N1vDc4PwI/vshcfwUZEaMrUdNjdu/mdxAt1jM3gcnGc="
)
PG_VERIFIER_PASSWORD = "scrampw"


def messages(data: bytes, mtype: int) -> list[bytes]:
    """Payloads of the frames in data, all of which must be of type mtype."""
    f = Framer()
    f.feed(data)
    out = []
    while (m := f.next_message()) is not None:
        assert m[0] == mtype
        out.append(m[1])
    assert f.buffered == 0
    return out


def auth_requests(data: bytes) -> list[tuple[int, bytes]]:
    return [parse_auth_request(p) for p in messages(data, AUTHENTICATION)]


def run_exchange(server: ServerAuth, client: ClientAuth) -> None:
    """Drive both sides to the end as a socket would; raises whatever either side raises."""
    out, done = server.start()
    while True:
        reply = b""
        for code, data in auth_requests(out):
            sent = client.receive(code, data)
            if sent is not None:
                reply += sent
        if done:
            assert reply == b""
            return
        (payload,) = messages(reply, PASSWORD)
        out, done = server.receive(payload)


def secrets_for(user: str, password: str) -> dict[str, UserSecret]:
    return {
        "plaintext": UserSecret(user, password=password),
        "md5": UserSecret(user, md5=md5_secret(password, user)),
        "scram": UserSecret(user, scram=make_scram_verifier(password)),
    }


def assert_auth_failed(excinfo: pytest.ExceptionInfo[PgError], user: str) -> None:
    err = excinfo.value
    assert type(err) is PgError
    assert err.sqlstate == "28P01"
    assert err.severity == "FATAL"
    assert err.message == f'password authentication failed for user "{user}"'


# ---------------------------------------------------------------------------------------------
# ServerAuth <-> ClientAuth


# Which secret kinds each method can check (md5 falls back to SCRAM for verifier-only users, as
# PostgreSQL does).
WORKS = {
    "md5": {"plaintext", "md5", "scram"},
    "scram-sha-256": {"plaintext", "scram"},
}


@pytest.mark.parametrize("kind", ["plaintext", "md5", "scram"])
@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
def test_right_password(method: str, kind: str) -> None:
    server = ServerAuth(method, "alice", secrets_for("alice", "s3cret")[kind])
    client = ClientAuth("alice", "s3cret")
    if kind in WORKS[method]:
        run_exchange(server, client)
        assert server.done and client.done
    else:
        with pytest.raises(PgError) as excinfo:
            run_exchange(server, client)
        assert_auth_failed(excinfo, "alice")
        assert not server.done


@pytest.mark.parametrize("kind", ["plaintext", "md5", "scram"])
@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
def test_wrong_password(method: str, kind: str) -> None:
    server = ServerAuth(method, "alice", secrets_for("alice", "s3cret")[kind])
    with pytest.raises(PgError) as excinfo:
        run_exchange(server, ClientAuth("alice", "guess"))
    assert_auth_failed(excinfo, "alice")
    assert not server.done
    # The exchange is over: nothing more is accepted.
    with pytest.raises(ProtocolViolation):
        server.receive(b"md5whatever\0")


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
def test_unknown_user_goes_through_exchange(method: str) -> None:
    server = ServerAuth(method, "mallory", None)
    out, done = server.start()
    assert not done
    expected_code = AUTH_MD5 if method == "md5" else AUTH_SASL
    assert auth_requests(out)[0][0] == expected_code
    with pytest.raises(PgError) as excinfo:
        run_exchange(ServerAuth(method, "mallory", None), ClientAuth("mallory", "pw"))
    assert_auth_failed(excinfo, "mallory")


def test_unknown_user_scram_salt_is_stable() -> None:
    """A mock salt that changed per attempt would tell unknown users from real ones."""

    def salt_of(user: str) -> str:
        server = ServerAuth("scram-sha-256", user, None)
        server.start()
        client = ScramClient(["SCRAM-SHA-256"], user, "pw")
        out, _ = server.receive(
            parse_payload(encode_sasl_initial("SCRAM-SHA-256", client.get_client_first().encode()))
        )
        ((code, data),) = auth_requests(out)
        assert code == AUTH_SASL_CONTINUE
        attrs = dict(a.split("=", 1) for a in data.decode().split(","))
        assert attrs["i"] == "4096"
        return attrs["s"]

    assert salt_of("ghost") == salt_of("ghost")
    assert salt_of("ghost") != salt_of("phantom")


def parse_payload(message: bytes) -> bytes:
    (payload,) = messages(message, PASSWORD)
    return payload


def test_trust() -> None:
    server = ServerAuth("trust", "anyone", None)
    out, done = server.start()
    assert done and server.done
    assert out == encode_auth(AUTH_OK)
    client = ClientAuth("anyone", None)
    assert client.receive(AUTH_OK, b"") is None
    assert client.done
    with pytest.raises(ProtocolViolation):
        server.receive(b"pw\0")


@pytest.mark.parametrize("method", METHODS)
def test_start_twice_is_a_bug(method: str) -> None:
    server = ServerAuth(method, "u", None)
    server.start()
    with pytest.raises(RuntimeError):
        server.start()


def test_receive_before_start_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        ServerAuth("md5", "u", None).receive(b"x\0")


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="ldap"):
        ServerAuth("ldap", "u", None)


def test_md5_challenge_and_response_format() -> None:
    server = ServerAuth("md5", "bob", UserSecret("bob", password="pw"))
    out, _ = server.start()
    ((code, salt),) = auth_requests(out)
    assert code == AUTH_MD5 and len(salt) == 4
    inner = hashlib.md5(b"pwbob").hexdigest()
    answer = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    out, done = server.receive(answer.encode() + b"\0")
    assert done and out == encode_auth(AUTH_OK)


def test_md5_salts_differ() -> None:
    salts = {auth_requests(ServerAuth("md5", "u", None).start()[0])[0][1] for _ in range(8)}
    assert len(salts) > 1


def test_md5_plaintext_secret_with_md5_user_collision() -> None:
    """The md5 hash is salted with the user name: the same password for another user fails."""
    server = ServerAuth("md5", "alice", UserSecret("alice", md5=md5_secret("pw", "bob")))
    with pytest.raises(PgError) as excinfo:
        run_exchange(server, ClientAuth("alice", "pw"))
    assert_auth_failed(excinfo, "alice")


def test_md5_empty_and_malformed_password_message() -> None:
    server = ServerAuth("md5", "alice", UserSecret("alice", password="pw"))
    server.start()
    with pytest.raises(PgError) as excinfo:
        server.receive(b"\0")
    assert_auth_failed(excinfo, "alice")
    server = ServerAuth("md5", "alice", UserSecret("alice", password="pw"))
    server.start()
    with pytest.raises(ProtocolViolation):
        server.receive(b"no terminator")


def test_scram_sasl_advertises_only_scram_sha_256() -> None:
    out, done = ServerAuth("scram-sha-256", "u", None).start()
    assert not done
    assert auth_requests(out) == [(AUTH_SASL, b"SCRAM-SHA-256\0\0")]


def test_scram_success_ends_with_final_then_ok() -> None:
    server = ServerAuth("scram-sha-256", "alice", UserSecret("alice", password="pw"))
    client = ClientAuth("alice", "pw")
    out, _ = server.start()
    (payload,) = messages(client.receive(*auth_requests(out)[0]) or b"", PASSWORD)
    out, _ = server.receive(payload)
    (payload,) = messages(client.receive(*auth_requests(out)[0]) or b"", PASSWORD)
    out, done = server.receive(payload)
    assert done
    codes = [code for code, _ in auth_requests(out)]
    assert codes == [AUTH_SASL_FINAL, AUTH_OK]


def libpq_style_exchange(server: ServerAuth, password: str) -> None:
    """libpq sends an empty SCRAM user name ("n=,r=..."), which PostgreSQL ignores."""
    mech = ScramMechanism()
    client = ScramClient(["SCRAM-SHA-256"], "placeholder", password, c_nonce="abcDEF0123+/xyz")
    first = client.get_client_first()
    assert first.startswith("n,,n=placeholder,")
    libpq_first = first.replace("n=placeholder", "n=")
    # Rebuild the client so its own state matches what libpq would have sent.
    client.client_first_bare = libpq_first[3:]
    server.start()
    out, _ = server.receive(parse_payload(encode_sasl_initial(mech.name, libpq_first.encode())))
    ((code, data),) = auth_requests(out)
    assert code == AUTH_SASL_CONTINUE
    client.set_server_first(data.decode())
    out, done = server.receive(client.get_client_final().encode())
    assert done
    (final, ok) = auth_requests(out)
    assert ok == (AUTH_OK, b"")
    client.set_server_final(final[1].decode())


def test_scram_empty_username_like_libpq() -> None:
    libpq_style_exchange(
        ServerAuth("scram-sha-256", "alice", UserSecret("alice", password="pw")), "pw"
    )


def test_scram_against_verifier_stored_by_postgresql() -> None:
    secret = UserSecret("scramuser", scram=PG_VERIFIER)
    run_exchange(
        ServerAuth("scram-sha-256", "scramuser", secret),
        ClientAuth("scramuser", PG_VERIFIER_PASSWORD),
    )
    with pytest.raises(PgError) as excinfo:
        run_exchange(ServerAuth("scram-sha-256", "scramuser", secret), ClientAuth("scramuser", "x"))
    assert_auth_failed(excinfo, "scramuser")
    libpq_style_exchange(ServerAuth("scram-sha-256", "scramuser", secret), PG_VERIFIER_PASSWORD)


def test_scram_user_name_is_not_checked() -> None:
    """As in PostgreSQL, the startup packet's user counts, not the SCRAM one."""
    server = ServerAuth("scram-sha-256", "alice", UserSecret("alice", password="pw"))
    run_exchange(server, ClientAuth("some,other=name", "pw"))
    assert server.done


def test_scram_wrong_mechanism() -> None:
    server = ServerAuth("scram-sha-256", "u", UserSecret("u", password="pw"))
    server.start()
    with pytest.raises(ProtocolViolation, match="invalid SASL authentication mechanism"):
        server.receive(parse_payload(encode_sasl_initial("SCRAM-SHA-1", b"n,,n=,r=abc")))


@pytest.mark.parametrize(
    "first",
    [
        b"",
        b"\xff\xfe",
        b"n,,",
        b"n,,r=abc",
        b"x,,n=,r=abc",
        b"p=tls-server-end-point,,n=,r=abc",  # channel binding was not offered
        b"n,a=someone,n=,r=abc",
        b"n,,n=,r=ab,c",
    ],
)
def test_scram_malformed_client_first(first: bytes) -> None:
    server = ServerAuth("scram-sha-256", "u", UserSecret("u", password="pw"))
    server.start()
    with pytest.raises(ProtocolViolation):
        server.receive(parse_payload(encode_sasl_initial("SCRAM-SHA-256", first)))


def test_scram_sasl_initial_without_data() -> None:
    server = ServerAuth("scram-sha-256", "u", UserSecret("u", password="pw"))
    server.start()
    payload = b"SCRAM-SHA-256\0\xff\xff\xff\xff"
    assert parse_sasl_initial(payload) == ("SCRAM-SHA-256", b"")
    with pytest.raises(ProtocolViolation):
        server.receive(payload)


def scram_to_final(server: ServerAuth, password: str) -> tuple[ScramClient, str]:
    client = ScramClient(["SCRAM-SHA-256"], "u", password)
    server.start()
    out, _ = server.receive(
        parse_payload(encode_sasl_initial("SCRAM-SHA-256", client.get_client_first().encode()))
    )
    client.set_server_first(auth_requests(out)[0][1].decode())
    return client, client.get_client_final()


def test_scram_tampered_nonce_is_protocol_violation() -> None:
    server = ServerAuth("scram-sha-256", "u", UserSecret("u", password="pw"))
    _, final = scram_to_final(server, "pw")
    attrs = final.split(",")
    attrs[1] = attrs[1] + "x"
    with pytest.raises(ProtocolViolation):
        server.receive(",".join(attrs).encode())


@pytest.mark.parametrize("proof", ["AAAA", "bm90IGEgcHJvb2Y="])
def test_scram_bad_proof_is_auth_failure(proof: str) -> None:
    server = ServerAuth("scram-sha-256", "u", UserSecret("u", password="pw"))
    _, final = scram_to_final(server, "pw")
    head = final.rsplit(",p=", 1)[0]
    with pytest.raises(PgError) as excinfo:
        server.receive(f"{head},p={proof}".encode())
    assert_auth_failed(excinfo, "u")


def test_scram_password_failing_saslprep_fails_cleanly() -> None:
    # U+0007 is a control character that SASLprep forbids.
    secret = UserSecret("u", password="bell\x07")
    server = ServerAuth("scram-sha-256", "u", secret)
    client = ScramClient(["SCRAM-SHA-256"], "u", "anything")
    server.start()
    out, _ = server.receive(
        parse_payload(encode_sasl_initial("SCRAM-SHA-256", client.get_client_first().encode()))
    )
    client.set_server_first(auth_requests(out)[0][1].decode())
    with pytest.raises(PgError) as excinfo:
        server.receive(client.get_client_final().encode())
    assert_auth_failed(excinfo, "u")


def test_secret_repr_hides_secrets() -> None:
    text = repr(UserSecret("alice", password="hunter2", md5=md5_secret("hunter2", "alice")))
    assert "alice" in text and "hunter2" not in text and "md5" not in text


# ---------------------------------------------------------------------------------------------
# ClientAuth against a simulated node


def test_client_cleartext() -> None:
    out = ClientAuth("u", "pw").receive(AUTH_CLEARTEXT, b"")
    assert out == encode_password(b"pw\0")


def test_client_md5() -> None:
    salt = b"\x01\x02\x03\x04"
    out = ClientAuth("u", "pw").receive(AUTH_MD5, salt)
    assert out is not None
    expected = "md5" + hashlib.md5(hashlib.md5(b"pwu").hexdigest().encode() + salt).hexdigest()
    assert parse_password(parse_payload(out)) == expected


def test_client_md5_with_stored_hash_as_password() -> None:
    salt = b"abcd"
    direct = ClientAuth("u", "pw").receive(AUTH_MD5, salt)
    via_hash = ClientAuth("u", md5_secret("pw", "u")).receive(AUTH_MD5, salt)
    assert direct == via_hash


@pytest.mark.parametrize("salt", [b"", b"abc", b"abcde"])
def test_client_md5_bad_salt(salt: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        ClientAuth("u", "pw").receive(AUTH_MD5, salt)


@pytest.mark.parametrize(
    ("code", "data"),
    [(AUTH_CLEARTEXT, b""), (AUTH_MD5, b"salt"), (AUTH_SASL, b"SCRAM-SHA-256\0\0")],
)
@pytest.mark.parametrize("password", [None, ""])
def test_client_no_password_configured(code: int, data: bytes, password: str | None) -> None:
    with pytest.raises(PgError) as excinfo:
        ClientAuth("carol", password).receive(code, data)
    err = excinfo.value
    assert err.sqlstate == "28P01" and err.fatal
    assert '"carol"' in err.message and "no password" in err.message


@pytest.mark.parametrize(
    ("code", "name"), [(7, "GSSAPI"), (9, "SSPI"), (2, "Kerberos"), (42, "42")]
)
def test_client_unsupported_method(code: int, name: str) -> None:
    with pytest.raises(PgError, match=name) as excinfo:
        ClientAuth("u", "pw").receive(code, b"")
    assert excinfo.value.sqlstate == "08004" and excinfo.value.fatal


def test_client_sasl_without_scram_sha_256() -> None:
    with pytest.raises(PgError, match="SCRAM-SHA-256-PLUS") as excinfo:
        ClientAuth("u", "pw").receive(AUTH_SASL, b"SCRAM-SHA-256-PLUS\0\0")
    assert excinfo.value.sqlstate == "08004"


def test_client_sasl_picks_plain_scram_when_plus_offered() -> None:
    out = ClientAuth("u", "pw").receive(AUTH_SASL, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
    assert out is not None
    mech, data = parse_sasl_initial(parse_payload(out))
    assert mech == "SCRAM-SHA-256"
    assert data.startswith(b"n,,n=u,r=")


def test_client_sasl_mechanisms_not_utf8() -> None:
    with pytest.raises(PgError, match="supports only SCRAM-SHA-256"):
        ClientAuth("u", "pw").receive(AUTH_SASL, b"\xff\0\0")


def test_client_scram_user_name_failing_saslprep() -> None:
    """The node ignores the SCRAM user name, so an odd role name must not stop the exchange."""
    user = "odd\x07name"
    secret = UserSecret(user, password="pw")
    run_exchange(ServerAuth("scram-sha-256", user, secret), ClientAuth(user, "pw"))


class FakeNode:
    """A node's side of SCRAM, built on scramp's server with a pg_authid verifier."""

    def __init__(self, verifier: str) -> None:
        info = parse_scram_verifier(verifier)
        self.server = ScramMechanism().make_server(lambda _u: info)

    def first(self, initial_message: bytes) -> bytes:
        mech, data = parse_sasl_initial(parse_payload(initial_message))
        assert mech == "SCRAM-SHA-256"
        self.server.set_client_first(data.decode())
        return self.server.get_server_first().encode()

    def final(self, response: bytes) -> bytes:
        self.server.set_client_final(parse_payload(response).decode())
        return self.server.get_server_final().encode()


def test_client_scram_against_postgresql_verifier() -> None:
    node = FakeNode(PG_VERIFIER)
    client = ClientAuth("scramuser", PG_VERIFIER_PASSWORD)
    initial = client.receive(AUTH_SASL, b"SCRAM-SHA-256\0\0")
    assert initial is not None
    response = client.receive(AUTH_SASL_CONTINUE, node.first(initial))
    assert response is not None
    assert client.receive(AUTH_SASL_FINAL, node.final(response)) is None
    assert not client.done
    assert client.receive(AUTH_OK, b"") is None
    assert client.done


def test_client_scram_rejects_forged_server_signature() -> None:
    node = FakeNode(PG_VERIFIER)
    client = ClientAuth("scramuser", PG_VERIFIER_PASSWORD)
    initial = client.receive(AUTH_SASL, b"SCRAM-SHA-256\0\0")
    assert initial is not None
    response = client.receive(AUTH_SASL_CONTINUE, node.first(initial))
    assert response is not None
    node.final(response)
    forged = b"v=" + base64.b64encode(bytes(32))
    with pytest.raises(PgError, match="signature") as excinfo:
        client.receive(AUTH_SASL_FINAL, forged)
    assert excinfo.value.sqlstate == "08004" and excinfo.value.fatal


def test_client_scram_wrong_password_is_rejected_by_node() -> None:
    node = FakeNode(PG_VERIFIER)
    client = ClientAuth("scramuser", "wrong")
    initial = client.receive(AUTH_SASL, b"SCRAM-SHA-256\0\0")
    assert initial is not None
    response = client.receive(AUTH_SASL_CONTINUE, node.first(initial))
    assert response is not None
    with pytest.raises(Exception, match="client keys don't match"):
        node.final(response)


def test_client_ok_before_scram_final_is_refused() -> None:
    """A node that skips SASLFinal never proved it knows the verifier."""
    node = FakeNode(PG_VERIFIER)
    client = ClientAuth("scramuser", PG_VERIFIER_PASSWORD)
    initial = client.receive(AUTH_SASL, b"SCRAM-SHA-256\0\0")
    assert initial is not None
    client.receive(AUTH_SASL_CONTINUE, node.first(initial))
    with pytest.raises(PgError) as excinfo:
        client.receive(AUTH_OK, b"")
    assert excinfo.value.sqlstate == "08004"


@pytest.mark.parametrize(
    "server_first",
    [
        b"\xff",
        b"garbage",
        b"r=someone-elses-nonce,s=QUJDREVGR0hJSktMTU5PUA==,i=4096",
        b"e=other-error",
    ],
)
def test_client_bad_server_first(server_first: bytes) -> None:
    client = ClientAuth("u", "pw")
    client.receive(AUTH_SASL, b"SCRAM-SHA-256\0\0")
    with pytest.raises(PgError) as excinfo:
        client.receive(AUTH_SASL_CONTINUE, server_first)
    assert excinfo.value.sqlstate in ("08004", "08P01")
    assert excinfo.value.fatal


def test_client_sasl_messages_out_of_order() -> None:
    with pytest.raises(ProtocolViolation):
        ClientAuth("u", "pw").receive(AUTH_SASL_CONTINUE, b"r=x,s=y,i=4096")
    with pytest.raises(ProtocolViolation):
        ClientAuth("u", "pw").receive(AUTH_SASL_FINAL, b"v=abc")
    client = ClientAuth("u", "pw")
    client.receive(AUTH_SASL, b"SCRAM-SHA-256\0\0")
    with pytest.raises(ProtocolViolation):
        client.receive(AUTH_SASL, b"SCRAM-SHA-256\0\0")
    done = ClientAuth("u", None)
    done.receive(AUTH_OK, b"")
    with pytest.raises(ProtocolViolation):
        done.receive(AUTH_CLEARTEXT, b"")


# ---------------------------------------------------------------------------------------------
# Verifiers


def test_verifier_made_like_postgresql_parses() -> None:
    salt, stored_key, server_key, iterations = ScramMechanism().make_auth_info(
        "pw", iteration_count=4096
    )
    b64 = base64.b64encode
    verifier = (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )
    assert parse_scram_verifier(verifier) == (salt, stored_key, server_key, 4096)
    run_exchange(
        ServerAuth("scram-sha-256", "u", UserSecret("u", scram=verifier)), ClientAuth("u", "pw")
    )


def test_postgresql_verifier_parses() -> None:
    salt, stored_key, server_key, iterations = parse_scram_verifier(PG_VERIFIER)
    assert iterations == 4096 and len(salt) == 16
    assert len(stored_key) == len(server_key) == 32


def test_make_scram_verifier_round_trip() -> None:
    v = make_scram_verifier("pw", 5000)
    assert v.startswith("SCRAM-SHA-256$5000:")
    assert parse_scram_verifier(v)[3] == 5000


@pytest.mark.parametrize(
    ("verifier", "why"),
    [
        ("SCRAM-SHA-256$4096:c2FsdA==", "malformed"),
        ("SCRAM-SHA-256$abc:" + PG_VERIFIER.split(":", 1)[1], "malformed"),
        ("SCRAM-SHA-1$4096:" + PG_VERIFIER.split(":", 1)[1], "malformed"),
        (PG_VERIFIER.replace("$4096:", "$1000:"), "1000 iterations"),
        (PG_VERIFIER.replace("vdLZ0Bf/CF1D2RCLeCKkIg==", "c2FsdA=="), "4-byte salt"),
        (PG_VERIFIER.replace("=:N1v", ":N1v"), "base64|malformed"),
        (PG_VERIFIER.rsplit(":", 1)[0] + ":c2hvcnQ=", "32 bytes"),
        (PG_VERIFIER + " ", "malformed"),
    ],
)
def test_bad_verifiers(verifier: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_scram_verifier(verifier)


def test_md5_secret_matches_postgresql() -> None:
    # As PostgreSQL 15 stored it for CREATE USER md5user PASSWORD 'md5pw' with md5 encryption.
    assert md5_secret("md5pw", "md5user") == "md5704ac3bc41dadc414b9aa9dbf5e63cdd"


# ---------------------------------------------------------------------------------------------
# Users file


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "users.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_users(tmp_path: Path) -> None:
    md5 = md5_secret("pw", "bob")
    path = write(
        tmp_path,
        "; PgBouncer-style comment\n"
        "# another comment\n"
        "\n"
        '"alice" "plain pass"\n'
        f'  "bob"\t"{md5}"  \n'
        f'"scramuser" "{PG_VERIFIER}"\n'
        '"quo""te" "pa""ss"\n'
        '"unicodé" "pässwörd"\n'
        '"upper" "md5ABCDEF0123456789ABCDEF0123456789"\n',
    )
    users = load_users(path)
    assert users["alice"] == UserSecret("alice", password="plain pass")
    assert users["bob"] == UserSecret("bob", md5=md5)
    assert users["scramuser"] == UserSecret("scramuser", scram=PG_VERIFIER)
    assert users['quo"te'] == UserSecret('quo"te', password='pa"ss')
    assert users["unicodé"].password == "pässwörd"
    # PostgreSQL only takes lowercase hex as an md5 hash; anything else is a plaintext password.
    assert users["upper"].password == "md5ABCDEF0123456789ABCDEF0123456789"
    assert len(users) == 6


def test_load_users_empty_file(tmp_path: Path) -> None:
    assert load_users(write(tmp_path, "")) == {}


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("alice pw", "double-quoted"),
        ('"alice"', "found 1 field"),
        ('"alice" "pw" "extra"', "found 3 field"),
        ('"alice" "pw', "unterminated"),
        ('"alice""pw"', "found 1 field"),  # "" is an escaped quote: one field alice"pw
        ('"alice"x "pw"', "whitespace"),
        ('"" "pw"', "empty user"),
        ('"alice" ""', "empty secret"),
        ('"alice" "SCRAM-SHA-256$4096:nonsense"', "malformed SCRAM"),
    ],
)
def test_load_users_malformed(tmp_path: Path, line: str, why: str) -> None:
    path = write(tmp_path, f'# header\n"ok" "pw"\n{line}\n')
    with pytest.raises(ValueError, match=why) as excinfo:
        load_users(path)
    assert str(excinfo.value).startswith(f"{path}, line 3: ")


def test_load_users_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path, '"a" "1"\n"b" "2"\n"a" "3"\n')
    with pytest.raises(ValueError, match=r'line 3: user "a" already listed on line 1'):
        load_users(path)


def test_load_users_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    path.write_bytes(b'"a" "\xff"\n')
    with pytest.raises(ValueError, match="UTF-8") as excinfo:
        load_users(path)
    assert str(path) in str(excinfo.value)


def test_load_users_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_users(tmp_path / "nope.txt")


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
def test_users_file_end_to_end(tmp_path: Path, method: str) -> None:
    path = write(
        tmp_path,
        f'"p" "pw"\n"m" "{md5_secret("pw", "m")}"\n"s" "{make_scram_verifier("pw")}"\n',
    )
    users = load_users(path)
    for user in users:
        if method == "scram-sha-256" and user == "m":
            continue
        run_exchange(ServerAuth(method, user, users[user]), ClientAuth(user, "pw"))
