"""What a study shows of itself: a PostgreSQL password never appears (messages, pages, `ps`), study names
are shell-quoted in the commands printed to copy, are plain text in reports and in the dashboard note,
and never make two studies share a report file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from test_cli_errors import tiny_toml

from dils_search.cli import main
from dils_search.search.study import run_study

# ---------------------------------------------------------------- D3: PostgreSQL passwords


@pytest.fixture
def secret_url(postgres_url: str) -> Iterator[tuple[str, str]]:
    """The test database, owned by a new role with a password found nowhere else."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = os.environ["DILS_TEST_POSTGRES_URL"]
    secret, role = f"pw{uuid.uuid4().hex}", f"dils_role_{uuid.uuid4().hex[:8]}"
    db = make_url(postgres_url).database
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}'"))
        conn.execute(text(f'ALTER DATABASE "{db}" OWNER TO {role}'))
    try:
        yield make_url(postgres_url).set(username=role, password=secret).render_as_string(hide_password=False), secret
    finally:
        inside = create_engine(make_url(admin_url).set(database=db), isolation_level="AUTOCOMMIT")
        with inside.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"))
            conn.execute(text(f"REASSIGN OWNED BY {role} TO CURRENT_USER"))
        inside.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{db}" OWNER TO CURRENT_USER'))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def _children_argv(pid: int) -> list[str]:
    """The command lines of ``pid``'s child processes, as `ps` shows them."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "stat").read_text().split(")")[1].split()[1] == str(pid):
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return out


@pytest.mark.slow
@pytest.mark.postgres
def test_a_postgres_password_is_never_shown(secret_url: tuple[str, str], tmp_path: Path) -> None:
    import dils_search as ds
    from dils_search.errors import InputError

    url, secret = secret_url
    (tmp_path / "c.toml").write_text(tiny_toml(search={"n_trials": 4}, final={"epochs": 1}))
    run = subprocess.Popen([sys.executable, "-m", "dils_search", "run", "c.toml", "--storage", url, "--workers", "2",
                            "--quiet"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    while run.poll() is None:  # the workers' command lines, while they live
        seen += [argv for argv in _children_argv(run.pid) if " worker " in argv]
        time.sleep(0.2)
    out, err = run.communicate()
    assert run.returncode == 0, err[-2000:]
    assert seen, "no worker process was seen"
    leaks = [f"worker argv: {argv}" for argv in seen if secret in argv]  # every place, then one assertion
    leaks += ["run's output (the next: lines)"] if secret in out + err else []
    leaks += [f"{page.name}" for page in (tmp_path / "dils_report").glob("*.html") if secret in page.read_text()]
    assert main(["report", "--storage", url, "--study-name", "tiny", "--out", str(tmp_path / "r.html")]) == 0
    leaks += ["report's page"] if secret in (tmp_path / "r.html").read_text() else []
    x = np.random.default_rng(0).standard_normal((60, 3))
    data = ds.Dataset.from_arrays(x, (x[:, 0] > 0).astype(np.int64))
    tree = ds.GrowthTree(ds.MLPSpec(3, [4], 2), data, storage=url, artifacts=str(tmp_path / "tree"))
    with pytest.raises(InputError, match="is not in storage=") as caught:
        tree.node("0" * 64)
    leaks += ["GrowthTree.node()'s error"] if secret in str(caught.value) else []
    tree.close()
    assert leaks == [], "the password shows in: " + "; ".join(leaks)
    assert ":***@" in out  # the next: lines show the URL, masked


@pytest.mark.slow
@pytest.mark.postgres
def test_the_compare_page_masks_the_password(secret_url: tuple[str, str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from test_compare import ENTRIES, _write_config

    url, secret = secret_url
    config = _write_config(tmp_path / "cmp.toml", ENTRIES, n_trials=1)
    assert main(["compare", str(config), "--out", str(tmp_path / "out"), "--storage", url, "--artifacts",
                 str(tmp_path / "art"), "--quiet"]) == 0
    captured = capsys.readouterr()
    for name in ("report.html", "summary.csv", "summary.json"):
        assert secret not in (tmp_path / "out" / name).read_text(), name
    assert secret not in captured.out + captured.err


# ---------------------------------------------------------------- D8, D10: names in commands and file names


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str]]:
    root = tmp_path_factory.mktemp("names")
    url = f"sqlite:///{root / 's.db'}"
    names = ["x; touch PWNED #", "e\x1b[31mred\x1b[0m", "exp:1", "exp?1", "it's"]
    for name in names:
        run_study(tiny_config(search={"n_trials": 1}, final={"epochs": 0}), url, str(root / "art"), name, progress=False)
    return root, url, names


def test_the_next_lines_are_commands_that_run_as_printed(odd_names: tuple[Path, str, list[str]],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root, url, names = odd_names
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for i, name in enumerate(names[:2] + names[4:]):
        capsys.readouterr()
        assert main(["show", "--storage", url, "--study-name", name]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out, "an escape sequence reached the terminal"
        (line,) = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("dils-search export")]
        work = root / f"copy{i}"
        work.mkdir()
        done = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (line, done.stderr[-2000:])
        assert sorted(p.name for p in work.iterdir()) == ["model.pt"], line  # and no PWNED file


def test_each_study_gets_its_own_default_report_file(odd_names: tuple[Path, str, list[str]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root, url, names = odd_names
    work = root / "reports"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in names[2:4]:  # exp:1 and exp?1 squash to the same characters
        assert main(["resume", "--storage", url, "--study-name", name, "--quiet"]) == 0
    pages = sorted((work / "dils_report").iterdir())
    assert len(pages) == 2, pages
    assert sorted(name for name in names[2:4] for p in pages if f"Study {name};" in p.read_text()) == sorted(names[2:4])


def test_plain_study_names_keep_their_report_file_name() -> None:
    from dils_search.cli.common import report_file_name

    assert report_file_name("digits-mlp") == "digits-mlp.html"
    assert report_file_name("exp:1") != report_file_name("exp?1") and report_file_name("exp:1").startswith("exp_1-")
    assert "/" not in report_file_name("../../x") and not report_file_name("..").startswith(".")


# ---------------------------------------------------------------- D9: markup in study names


@pytest.mark.slow
def test_markup_in_a_study_name_is_text_in_a_multi_study_report(tmp_path: Path) -> None:
    from test_browser import _dom, chromium

    browser = chromium()
    if browser is None:
        if os.environ.get("DILS_REQUIRE_CHROMIUM") == "1":
            pytest.fail("DILS_REQUIRE_CHROMIUM=1 but chromium is not installed")
        pytest.skip("chromium is not installed")
    url, art = f"sqlite:///{tmp_path / 's.db'}", str(tmp_path / "art")
    evil = '<a href="https://evil.example/x">click me</a><b>bold</b>'
    for name in (evil, "plain"):
        run_study(tiny_config(search={"n_trials": 2}, final={"epochs": 0}), url, art, name, progress=False)
    out = tmp_path / "r.html"
    assert main(["report", "--storage", url, "--study-name", evil, "--study-name", "plain", "--out", str(out)]) == 0
    dom = _dom(browser, out.resolve().as_uri(), tmp_path)
    assert "js-plotly-plot" in dom and "plain" in dom  # the figures rendered
    assert not re.search(r"<a\b[^>]*evil\.example", dom), "a study name became a live link"
    assert re.search(r'class="legendtext"[^>]*>[^<]*&lt;a href=', dom), "the name is not in the legend as text"


def test_the_dashboard_note_shows_a_name_as_code() -> None:
    from dils_search.search.finalize import md_code

    assert md_code("x") == "` x `"
    assert md_code("a`b``c") == "``` a`b``c ```"  # a longer fence than any run inside
    assert md_code("line\nbreak\x1b") == "` line\\nbreak\\x1b `"


@pytest.mark.slow
def test_markup_in_a_study_name_is_text_in_the_dashboard_note(tmp_path: Path) -> None:
    """optuna-dashboard renders the note's Markdown: the name must not become a link or a remote image."""
    pytest.importorskip("optuna_dashboard")
    from test_browser import FLAGS, chromium
    from test_dashboard import serve

    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed")
    url, art = f"sqlite:///{tmp_path / 'd.db'}", tmp_path / "art"
    evil = '[click](https://evil.example/a) ![pic](https://evil.example/i.png) <img src="https://evil.example/r.png">'
    run_study(tiny_config(search={"n_trials": 2}, final={"epochs": 1}), url, str(art), evil, progress=False)
    with serve(url) as base:
        flags = [f for f in FLAGS if not f.startswith("--host-resolver-rules")]
        page = subprocess.run([browser, *flags, f"--user-data-dir={tmp_path / 'profile'}",
                               f"{base}/dashboard/studies/1/note"], capture_output=True, text=True)
    dom = page.stdout
    assert "Recommended architecture" in dom, dom[-2000:]  # the note rendered
    assert not re.search(r"<a\b[^>]*evil\.example", dom), "the study name became a live link"
    assert not re.search(r"<img\b[^>]*evil\.example", dom), "the study name became a remote image"
