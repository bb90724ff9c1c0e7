"""The suite's own rules: under CI=true a skip outside the named allowlist fails the run."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(textwrap.dedent("""
        import pytest
        from conftest import skip_because

        def test_allowed():
            skip_because("no-gpu", "needs CUDA")

        def test_missing_tool():
            pytest.skip("curl is not installed")

        @pytest.fixture
        def missing_cache():
            pytest.skip("the MIDI cache is empty")

        def test_skipped_by_a_fixture(missing_cache):
            pass

        @pytest.mark.xfail(reason="known")
        def test_xfail_is_not_a_skip():
            assert False
        """))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "-o", "addopts=", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.timeout(120)
def test_unlisted_skips_fail_under_ci(tmp_path):
    r = _run(tmp_path, "true")
    assert r.returncode == 1, r.stdout
    assert "1 failed, 1 skipped, 1 xfailed, 1 error" in r.stdout, r.stdout
    assert "outside the allowlist" in r.stdout and "curl is not installed" in r.stdout


@pytest.mark.timeout(120)
def test_skips_are_only_skips_outside_ci(tmp_path):
    r = _run(tmp_path, None)
    assert r.returncode == 0, r.stdout
    assert "3 skipped, 1 xfailed" in r.stdout, r.stdout


def test_skip_reasons_must_be_named():
    from conftest import ALLOWED_SKIPS, skip_because

    assert set(ALLOWED_SKIPS) == {"not-root", "root", "no-gpu"}  # short, and changed only on purpose
    with pytest.raises(ValueError, match="not an allowed skip reason"):
        skip_because("no-curl", "curl is missing")
