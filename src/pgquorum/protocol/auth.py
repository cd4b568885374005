"""Sans-IO password authentication, in both directions.

:class:`ServerAuth` authenticates a client connecting to the router (trust, md5, SCRAM-SHA-256),
:class:`ClientAuth` authenticates the router to a PostgreSQL node. SCRAM itself is done by
``scramp``; this module only adapts it to the protocol 3.0 Authentication messages and to the
secrets PostgreSQL keeps (plaintext, ``md5...`` hashes, ``SCRAM-SHA-256$...`` verifiers).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from scramp import ScramClient, ScramException, ScramMechanism
from scramp.core import ScramServer
from scramp.utils import ServerError

from .errors import INVALID_PASSWORD, PgError, ProtocolViolation
from .messages import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    cstr,
    encode_auth,
    encode_password,
    encode_sasl_initial,
    parse_password,
    parse_sasl_initial,
    parse_sasl_mechanisms,
)

SCRAM_SHA_256 = "SCRAM-SHA-256"
METHODS = ("trust", "md5", "scram-sha-256")

# "sqlclient unable to establish sqlconnection" would blame the router; 08004 says the node
# (the server side of this connection) refused or could not prove itself.
SERVER_REJECTED_CONNECTION = "08004"

# scramp refuses iteration counts outside this range (PostgreSQL's default is 4096).
_MIN_ITERATIONS = 4096
_MAX_ITERATIONS = 10_000_000
_MIN_SALT_LEN = 12

_MD5_RE = re.compile(r"md5[0-9a-f]{32}")
_B64 = r"[A-Za-z0-9+/]+={0,2}"
_SCRAM_RE = re.compile(rf"SCRAM-SHA-256\$(\d+):({_B64})\$({_B64}):({_B64})")

_AUTH_NAMES = {
    2: "Kerberos V5",
    6: "SCM credentials",
    7: "GSSAPI",
    8: "GSSAPI",
    9: "SSPI",
}


@dataclass(frozen=True)
class UserSecret:
    """What the router knows about one user's password. Secrets are kept out of repr()."""

    name: str
    password: str | None = field(default=None, repr=False)  # plaintext, if known
    md5: str | None = field(default=None, repr=False)  # "md5" + md5(password + user) hex
    scram: str | None = field(default=None, repr=False)  # pg_authid SCRAM-SHA-256 verifier


def parse_scram_verifier(verifier: str) -> tuple[bytes, bytes, bytes, int]:
    """Split a pg_authid SCRAM-SHA-256 verifier into (salt, stored_key, server_key, iterations).

    Raises ValueError saying what is wrong.
    """
    m = _SCRAM_RE.fullmatch(verifier)
    if m is None:
        raise ValueError(
            "malformed SCRAM-SHA-256 verifier, expected "
            "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
        )
    iterations = int(m[1])
    try:
        salt, stored_key, server_key = (base64.b64decode(g, validate=True) for g in m.groups()[1:])
    except binascii.Error:
        raise ValueError("malformed SCRAM-SHA-256 verifier: invalid base64") from None
    if len(stored_key) != 32 or len(server_key) != 32:
        raise ValueError("malformed SCRAM-SHA-256 verifier: keys must be 32 bytes")
    if not _MIN_ITERATIONS <= iterations <= _MAX_ITERATIONS:
        raise ValueError(
            f"SCRAM-SHA-256 verifier has {iterations} iterations; only "
            f"{_MIN_ITERATIONS} to {_MAX_ITERATIONS} are supported"
        )
    if len(salt) < _MIN_SALT_LEN:
        raise ValueError(
            f"SCRAM-SHA-256 verifier has a {len(salt)}-byte salt; at least "
            f"{_MIN_SALT_LEN} bytes are required"
        )
    return salt, stored_key, server_key, iterations


def make_scram_verifier(password: str, iterations: int = _MIN_ITERATIONS) -> str:
    """A verifier in the format PostgreSQL stores in pg_authid.rolpassword."""
    salt, stored_key, server_key, i = ScramMechanism().make_auth_info(
        password, iteration_count=iterations
    )
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${i}:{b64(salt).decode()}${b64(stored_key).decode()}:"
        + b64(server_key).decode()
    )


def md5_secret(password: str, user: str) -> str:
    """The md5 form PostgreSQL stores: "md5" + md5(password + user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def _md5_response(inner_hex: str, salt: bytes) -> str:
    """What a client sends in answer to AuthenticationMD5Password."""
    return "md5" + hashlib.md5(inner_hex.encode() + salt).hexdigest()


# ---------------------------------------------------------------------------------------------
# Users file


def _split_fields(line: str) -> list[str]:
    """The double-quoted fields of one users-file line; "" inside a field is a quote."""
    fields: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return fields
        if line[i] != '"':
            raise ValueError(f"expected a double-quoted field at column {i + 1}")
        start = i
        i += 1
        buf: list[str] = []
        while True:
            if i >= n:
                raise ValueError(f"unterminated quoted field starting at column {start + 1}")
            c = line[i]
            if c == '"':
                if i + 1 < n and line[i + 1] == '"':
                    buf.append('"')
                    i += 2
                    continue
                i += 1
                break
            buf.append(c)
            i += 1
        fields.append("".join(buf))
        if i < n and not line[i].isspace():
            raise ValueError(f"expected whitespace after the field ending at column {i}")


def _secret_for(user: str, secret: str) -> UserSecret:
    if _MD5_RE.fullmatch(secret):
        return UserSecret(user, md5=secret)
    if secret.startswith("SCRAM-SHA-256$"):
        # A mistyped verifier would otherwise silently become a (wrong) plaintext password.
        parse_scram_verifier(secret)
        return UserSecret(user, scram=secret)
    return UserSecret(user, password=secret)


def load_users(path: Path) -> dict[str, UserSecret]:
    """Read a PgBouncer-style userlist: one ``"user" "secret"`` per line.

    ``""`` inside a field is a literal quote; blank lines and lines starting with ``;`` or
    ``#`` are ignored. The secret is plaintext, ``md5`` + 32 lowercase hex digits (as
    PostgreSQL decides it) or a pg_authid SCRAM-SHA-256 verifier. Raises ValueError naming the
    file and line for anything malformed, including a user listed twice.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    users: dict[str, UserSecret] = {}
    first_seen: dict[str, int] = {}
    # Not splitlines(): it also splits on characters like U+2028 that may be inside a password.
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        try:
            fields = _split_fields(line)
            if len(fields) != 2:
                raise ValueError(f'expected "user" "secret", found {len(fields)} field(s)')
            user, secret = fields
            if not user:
                raise ValueError("empty user name")
            if not secret:
                raise ValueError(f'empty secret for user "{user}"')
            if user in users:
                raise ValueError(f'user "{user}" already listed on line {first_seen[user]}')
            users[user] = _secret_for(user, secret)
            first_seen[user] = lineno
        except ValueError as e:
            raise ValueError(f"{path}, line {lineno}: {e}") from None
    return users


# ---------------------------------------------------------------------------------------------
# Router as server: authenticating clients


def _auth_failed(user: str) -> PgError:
    return PgError(
        INVALID_PASSWORD, f'password authentication failed for user "{user}"', severity="FATAL"
    )


@functools.lru_cache(maxsize=1024)
def _auth_info_from_password(user: str, password: str) -> tuple[bytes, bytes, bytes, int] | None:
    # Cached: 4096 PBKDF2 rounds per connection would stall the event loop under load. Keyed
    # by user too, so that two users with one password don't show the same salt.
    try:
        salt, stored_key, server_key, i = ScramMechanism().make_auth_info(
            password, iteration_count=_MIN_ITERATIONS
        )
    except ScramException:
        # The password fails SASLprep; PostgreSQL would then use the raw bytes, scramp can't.
        return None
    return salt, stored_key, server_key, i


# Per-process key for mock salts: an unknown user always gets the same salt, so repeated
# attempts can't tell unknown users (random salt each time) from real ones (fixed salt).
_MOCK_KEY = secrets.token_bytes(32)


def _mock_auth_info(user: str) -> tuple[bytes, bytes, bytes, int]:
    salt = hmac.digest(_MOCK_KEY, user.encode(), "sha256")[:16]
    return salt, secrets.token_bytes(32), secrets.token_bytes(32), _MIN_ITERATIONS


class ServerAuth:
    """Authenticates one client. ``method`` is "trust", "md5" or "scram-sha-256".

    ``secret`` is None for a user not in the users file: the exchange still runs to the end and
    fails exactly like a wrong password, so clients can't probe which users exist. As in
    PostgreSQL, "md5" uses SCRAM for a user whose only known secret is a SCRAM verifier.
    """

    def __init__(self, method: str, user: str, secret: UserSecret | None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown authentication method {method!r}")
        self.method = method
        self.user = user
        self._secret = secret
        self._mechanism = method
        if (
            method == "md5"
            and secret is not None
            and secret.scram is not None
            and secret.password is None
            and secret.md5 is None
        ):
            self._mechanism = "scram-sha-256"
        self._stage = "new"
        self._md5_salt = b""
        self._scram: ScramServer | None = None
        self._scram_real = False  # False when running against a mock verifier

    @property
    def done(self) -> bool:
        return self._stage == "done"

    def start(self) -> tuple[bytes, bool]:
        """The first Authentication message to send, and whether authentication is complete."""
        if self._stage != "new":
            raise RuntimeError("ServerAuth.start() called twice")
        if self._mechanism == "trust":
            self._stage = "done"
            return encode_auth(AUTH_OK), True
        if self._mechanism == "md5":
            self._md5_salt = secrets.token_bytes(4)
            self._stage = "md5"
            return encode_auth(AUTH_MD5, self._md5_salt), False
        self._stage = "sasl-initial"
        return encode_auth(AUTH_SASL, cstr(SCRAM_SHA_256) + b"\0"), False

    def receive(self, payload: bytes) -> tuple[bytes, bool]:
        """Handle the payload of a client 'p' message; returns (bytes to send, done).

        Raises PgError 28P01 (FATAL) when authentication fails and ProtocolViolation when the
        client sends something that is not part of the exchange.
        """
        stage = self._stage
        if stage == "new":
            raise RuntimeError("ServerAuth.receive() called before start()")
        try:
            if stage == "md5":
                return self._receive_md5(payload)
            if stage == "sasl-initial":
                return self._receive_sasl_initial(payload)
            if stage == "sasl-final":
                return self._receive_sasl_final(payload)
        except PgError:
            self._stage = "failed"
            raise
        raise ProtocolViolation("unexpected password message: authentication is not in progress")

    def _fail(self) -> PgError:
        return _auth_failed(self.user)

    def _receive_md5(self, payload: bytes) -> tuple[bytes, bool]:
        response = parse_password(payload)
        s = self._secret
        inner: str | None = None
        if s is not None:
            if s.md5 is not None:
                inner = s.md5[3:]
            elif s.password is not None:
                inner = md5_secret(s.password, self.user)[3:]
        if inner is None:
            raise self._fail()
        expected = _md5_response(inner, self._md5_salt)
        if not hmac.compare_digest(expected.encode(), response.encode()):
            raise self._fail()
        self._stage = "done"
        return encode_auth(AUTH_OK), True

    def _auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        s = self._secret
        info: tuple[bytes, bytes, bytes, int] | None = None
        if s is not None:
            if s.scram is not None:
                try:
                    info = parse_scram_verifier(s.scram)
                except ValueError:
                    info = None
            elif s.password is not None:
                info = _auth_info_from_password(self.user, s.password)
        self._scram_real = info is not None
        return info if info is not None else _mock_auth_info(self.user)

    def _receive_sasl_initial(self, payload: bytes) -> tuple[bytes, bool]:
        mechanism, data = parse_sasl_initial(payload)
        if mechanism != SCRAM_SHA_256:
            raise ProtocolViolation(
                f"client selected an invalid SASL authentication mechanism {mechanism!r}"
            )
        client_first = _decode_scram(data, "SCRAM client-first-message")
        info = self._auth_info()
        server = ScramMechanism(SCRAM_SHA_256).make_server(lambda _username: info)
        gs2, bare = _split_client_first(client_first)
        # PostgreSQL ignores the SCRAM user name (it uses the startup packet's) and libpq sends
        # it empty ("n=,r=..."), which scramp rejects; let scramp parse a stand-in, then restore
        # the bare message as sent, since the client's proof is computed over it.
        try:
            server.set_client_first(gs2 + "n=*" + bare[bare.find(",") :])
            server.client_first_bare = bare
            server_first = server.get_server_first()
        except ScramException as e:
            raise ProtocolViolation(f"malformed SCRAM client-first-message: {e}") from None
        self._scram = server
        self._stage = "sasl-final"
        return encode_auth(AUTH_SASL_CONTINUE, server_first.encode()), False

    def _receive_sasl_final(self, payload: bytes) -> tuple[bytes, bool]:
        assert self._scram is not None
        client_final = _decode_scram(payload, "SCRAM client-final-message")
        try:
            self._scram.set_client_final(client_final)
            server_final = self._scram.get_server_final()
        except ScramException as e:
            if e.server_error is ServerError.INVALID_PROOF:
                raise self._fail() from None
            raise ProtocolViolation(f"malformed SCRAM client-final-message: {e}") from None
        if not self._scram_real:
            raise self._fail()
        self._stage = "done"
        return encode_auth(AUTH_SASL_FINAL, server_final.encode()) + encode_auth(AUTH_OK), True


def _decode_scram(data: bytes, what: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ProtocolViolation(f"malformed {what}: not UTF-8") from None


def _scram_client(user: str, password: str) -> ScramClient:
    try:
        return ScramClient([SCRAM_SHA_256], user, password)
    except ScramException:
        # The node ignores the SCRAM user name (it uses the startup packet's), but scramp
        # insists on one that passes SASLprep; retry with a stand-in in case the name was the
        # problem. If the password is, this raises again.
        return ScramClient([SCRAM_SHA_256], "*", password)


def _split_client_first(message: str) -> tuple[str, str]:
    """(gs2 header including its two commas, client-first-message-bare)."""
    first = message.find(",")
    second = message.find(",", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolViolation("malformed SCRAM client-first-message: no GS2 header")
    gs2, bare = message[: second + 1], message[second + 1 :]
    if not bare.startswith("n=") or "," not in bare:
        raise ProtocolViolation("malformed SCRAM client-first-message: expected n=...,r=...")
    return gs2, bare


# ---------------------------------------------------------------------------------------------
# Router as client: authenticating to a node


class ClientAuth:
    """Authenticates the router to a PostgreSQL node as ``user`` with ``password``.

    ``password`` may be None (the node must then trust the router). For md5 only, a password
    of the form "md5" + 32 hex digits is taken as the stored hash, as PostgreSQL itself does
    for such strings, so md5 users from a users file can be passed through.
    """

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.password = password
        self._scram: ScramClient | None = None
        self._stage = "new"  # new -> sasl-continue -> sasl-final -> sasl-done -> done

    @property
    def done(self) -> bool:
        return self._stage == "done"

    def receive(self, code: int, data: bytes) -> bytes | None:
        """Answer one Authentication request; None when there is nothing to send."""
        if code == AUTH_OK:
            if self._stage in ("sasl-continue", "sasl-final"):
                # libpq refuses this too: the node skipped proving it knows the verifier.
                raise self._rejected("node completed SCRAM authentication without proving itself")
            self._stage = "done"
            return None
        if self._stage == "done":
            raise ProtocolViolation(
                f"node sent authentication request {code} after AuthenticationOk"
            )
        if code == AUTH_CLEARTEXT:
            return encode_password(cstr(self._need_password("cleartext")))
        if code == AUTH_MD5:
            if len(data) != 4:
                raise ProtocolViolation("invalid AuthenticationMD5Password message: bad salt")
            password = self._need_password("md5")
            inner = (
                password[3:] if _MD5_RE.fullmatch(password) else md5_secret(password, self.user)[3:]
            )
            return encode_password(cstr(_md5_response(inner, data)))
        if code == AUTH_SASL:
            return self._sasl_start(data)
        if code == AUTH_SASL_CONTINUE:
            return self._sasl_continue(data)
        if code == AUTH_SASL_FINAL:
            self._sasl_final(data)
            return None
        name = _AUTH_NAMES.get(code, f"method {code}")
        raise self._rejected(
            f"node requested {name} authentication, which the router does not support"
        )

    def _rejected(self, message: str) -> PgError:
        return PgError(SERVER_REJECTED_CONNECTION, message, severity="FATAL")

    def _need_password(self, method: str) -> str:
        if not self.password:
            raise PgError(
                INVALID_PASSWORD,
                f'node requires {method} password authentication for user "{self.user}" '
                "but no password is configured for it",
                severity="FATAL",
            )
        return self.password

    def _sasl_start(self, data: bytes) -> bytes:
        if self._stage != "new":
            raise ProtocolViolation("node restarted SASL authentication")
        try:
            mechanisms = parse_sasl_mechanisms(data)
        except UnicodeDecodeError:
            raise ProtocolViolation("invalid AuthenticationSASL message: not UTF-8") from None
        if SCRAM_SHA_256 not in mechanisms:
            raise self._rejected(
                f"node offered SASL mechanisms {', '.join(mechanisms) or '(none)'}; "
                "the router supports only SCRAM-SHA-256"
            )
        password = self._need_password("SCRAM-SHA-256")
        try:
            client = _scram_client(self.user, password)
        except ScramException as e:
            raise PgError(
                INVALID_PASSWORD,
                f'the password configured for user "{self.user}" cannot be used with SCRAM: {e}',
                severity="FATAL",
            ) from None
        self._scram = client
        self._stage = "sasl-continue"
        return encode_sasl_initial(SCRAM_SHA_256, client.get_client_first().encode())

    def _sasl_continue(self, data: bytes) -> bytes:
        if self._stage != "sasl-continue" or self._scram is None:
            raise ProtocolViolation("node sent AuthenticationSASLContinue out of order")
        try:
            self._scram.set_server_first(_decode_scram(data, "SCRAM server-first-message"))
            client_final = self._scram.get_client_final()
        except ScramException as e:
            raise self._rejected(f"invalid SCRAM server-first-message from node: {e}") from None
        self._stage = "sasl-final"
        return encode_password(client_final.encode())

    def _sasl_final(self, data: bytes) -> None:
        if self._stage != "sasl-final" or self._scram is None:
            raise ProtocolViolation("node sent AuthenticationSASLFinal out of order")
        try:
            self._scram.set_server_final(_decode_scram(data, "SCRAM server-final-message"))
        except ScramException as e:
            raise self._rejected(f"node's SCRAM server signature did not verify: {e}") from None
        self._stage = "sasl-done"
