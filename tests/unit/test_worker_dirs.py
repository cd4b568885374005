"""The workers' private directories: known names in the shared temporary directory, so each
must be this user's alone before a worker listens or connects there."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pgquorum.config import ConfigError
from pgquorum.router.workers import own_dir


def test_a_new_directory_is_made_for_this_user_alone(tmp_path: Path) -> None:
    path = tmp_path / "w0"
    own_dir(path)
    st = path.lstat()
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
    assert stat.S_IMODE(st.st_mode) == 0o700
    own_dir(path)  # and taken again as it is


@pytest.mark.parametrize("kind", ["open mode", "symlink", "file"])
def test_a_directory_others_may_use_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "w0"
    if kind == "open mode":
        path.mkdir(mode=0o700)
        path.chmod(0o777)
    elif kind == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        path.symlink_to(target)
    else:
        path.write_text("")
    with pytest.raises(ConfigError) as e:
        own_dir(path)
    assert str(path) in str(e.value) and "mode 0700" in str(e.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w0"
    path.mkdir(mode=0o700)
    other = 65534  # nobody: needs no entry in /etc/passwd
    os.chown(path, other, -1)
    with pytest.raises(ConfigError, match=f"uid {other}"):
        own_dir(path)


def test_the_router_will_not_start_with_a_sibling_directory_it_does_not_own(
    tmp_path: Path,
) -> None:
    port = 1  # never listened on: the router stops before it binds
    config = tmp_path / "router.toml"
    config.write_text(
        f'[router]\nlisten = "127.0.0.1:{port}"\nauth_method = "trust"\nworkers = 2\n'
        f'state_db = "{tmp_path}/s.db"\n'
        '[group]\nname = "g"\n[[group.nodes]]\nname = "n1"\nhost = "127.0.0.1"\nport = 5\n'
    )
    sibling = Path(tempfile.gettempdir()) / f"pgquorum-{port}-w1"
    sibling.mkdir(mode=0o755, exist_ok=True)
    sibling.chmod(0o755)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pgquorum.cli", "router", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        sibling.rmdir()
        with contextlib.suppress(FileNotFoundError):
            (Path(tempfile.gettempdir()) / f"pgquorum-{port}-w0").rmdir()
    assert out.returncode == 2, out
    assert f"{sibling} must be a directory of this user" in out.stdout
