"""Mirrors come from the host's apt sources, never from the repository."""

from pvelab.build.hostapt import debian_mirrors, dib_mirror_env


def write(root, rel, text):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_deb822_sources(tmp_path):
    write(
        tmp_path,
        "etc/apt/sources.list.d/debian.sources",
        """\
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security/
Suites: bookworm-security
Components: main
""",
    )
    write(tmp_path, "etc/apt/sources.list.d/other.list.disabled", "deb http://nope/ x main\n")
    assert debian_mirrors(tmp_path) == (
        "http://mirror.example/debian",
        "http://mirror.example/debian-security",
    )


def test_one_line_sources_with_options(tmp_path):
    write(
        tmp_path,
        "etc/apt/sources.list",
        """\
# comment
deb [arch=amd64 signed-by=/k.gpg] http://archive.example/debian trixie main
deb http://sec.example/debian-security trixie-security main
deb http://vendor.example/apt nodistro main
""",
    )
    assert debian_mirrors(tmp_path) == ("http://archive.example/debian", "http://sec.example/debian-security")


def test_no_sources_leaves_dib_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("DIB_DISTRIBUTION_MIRROR", raising=False)
    assert debian_mirrors(tmp_path) == (None, None)
    assert dib_mirror_env(tmp_path) == {}


def test_caller_setting_wins(tmp_path, monkeypatch):
    write(tmp_path, "etc/apt/sources.list", "deb http://a.example/debian trixie main\n")
    monkeypatch.setenv("DIB_DISTRIBUTION_MIRROR", "http://mine.example/debian")
    assert "DIB_DISTRIBUTION_MIRROR" not in dib_mirror_env(tmp_path)
